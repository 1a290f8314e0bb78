using System.Runtime.InteropServices;
using System.Threading.Channels;

namespace BFMig.Native.Libvirt;

/// <summary>A domain event, identified by name and UUID (the libvirt domain object is only lent to the callback).</summary>
public abstract record LibvirtDomainEvent(string DomainName, string DomainUuid);

/// <summary>VIR_DOMAIN_EVENT_ID_LIFECYCLE. <paramref name="Detail"/> is the per-event virDomainEvent*DetailType value.</summary>
public sealed record LibvirtLifecycleDomainEvent(string DomainName, string DomainUuid, LibvirtLifecycleEvent Event, int Detail)
    : LibvirtDomainEvent(DomainName, DomainUuid)
{
    /// <summary>True for Started with <paramref name="detail"/>.</summary>
    public bool Is(LibvirtStartedDetail detail) => Event == LibvirtLifecycleEvent.Started && Detail == (int)detail;

    /// <summary>True for Suspended with <paramref name="detail"/>.</summary>
    public bool Is(LibvirtSuspendedDetail detail) => Event == LibvirtLifecycleEvent.Suspended && Detail == (int)detail;

    /// <summary>True for Resumed with <paramref name="detail"/>.</summary>
    public bool Is(LibvirtResumedDetail detail) => Event == LibvirtLifecycleEvent.Resumed && Detail == (int)detail;

    /// <summary>True for Stopped with <paramref name="detail"/>.</summary>
    public bool Is(LibvirtStoppedDetail detail) => Event == LibvirtLifecycleEvent.Stopped && Detail == (int)detail;
}

/// <summary>VIR_DOMAIN_EVENT_ID_MIGRATION_ITERATION: a new pass over guest memory started.</summary>
public sealed record LibvirtMigrationIterationDomainEvent(string DomainName, string DomainUuid, int Iteration)
    : LibvirtDomainEvent(DomainName, DomainUuid);

/// <summary>VIR_DOMAIN_EVENT_ID_JOB_COMPLETED, with the completed job's statistics.</summary>
public sealed record LibvirtJobCompletedDomainEvent(string DomainName, string DomainUuid, LibvirtJobStats Statistics)
    : LibvirtDomainEvent(DomainName, DomainUuid);

/// <summary>
/// Lifecycle, migration-iteration and job-completed events of all domains of one connection,
/// delivered through <see cref="Events"/>. Dispose to deregister. Events arrive only while
/// <see cref="LibvirtEventLoop"/> runs.
/// </summary>
public sealed unsafe class LibvirtDomainEventSubscription : IDisposable
{
    // libvirt events are rare (a few per guest state change or migration pass), so an
    // unbounded queue cannot grow without the guest doing real work; dropping any would be worse.
    private readonly Channel<LibvirtDomainEvent> _channel =
        Channel.CreateUnbounded<LibvirtDomainEvent>(new UnboundedChannelOptions { SingleReader = false, SingleWriter = true });
    private readonly ConnectHandle _connection;
    private readonly List<int> _callbackIds = [];
    private int _disposed;

    internal LibvirtDomainEventSubscription(ConnectHandle connection)
    {
        _connection = connection;
        bool added = false;
        connection.DangerousAddRef(ref added);
        try
        {
            Register(Interop.Libvirt.DomainEventIdLifecycle, (delegate* unmanaged<nint, nint, int, int, nint, int>)&OnLifecycle);
            Register(Interop.Libvirt.DomainEventIdMigrationIteration, (delegate* unmanaged<nint, nint, int, nint, void>)&OnMigrationIteration);
            Register(Interop.Libvirt.DomainEventIdJobCompleted,
                (delegate* unmanaged<nint, nint, Interop.Libvirt.VirTypedParameter*, int, nint, void>)&OnJobCompleted);
        }
        catch
        {
            Dispose();
            throw;
        }
    }

    /// <summary>The events, in the order libvirt delivered them. Completes when disposed.</summary>
    public ChannelReader<LibvirtDomainEvent> Events => _channel.Reader;

    private void Register(int eventId, void* callback)
    {
        // One GCHandle per registration; libvirt's free callback releases it once libvirt no
        // longer can call us (after deregistration, possibly later on the event-loop thread).
        GCHandle state = GCHandle.Alloc(this);
        try
        {
            int id = Interop.Libvirt.ConnectDomainEventRegisterAny(_connection, eventId, callback, GCHandle.ToIntPtr(state), &FreeState);
            _callbackIds.Add(id);
        }
        catch
        {
            state.Free();
            throw;
        }
    }

    private void Publish(LibvirtDomainEvent domainEvent) => _channel.Writer.TryWrite(domainEvent);

    private static LibvirtDomainEventSubscription? FromOpaque(nint opaque) =>
        GCHandle.FromIntPtr(opaque).Target as LibvirtDomainEventSubscription;

    [UnmanagedCallersOnly]
    private static int OnLifecycle(nint conn, nint domain, int eventType, int detail, nint opaque)
    {
        try
        {
            var (name, uuid) = Interop.Libvirt.DescribeBorrowedDomain(domain);
            FromOpaque(opaque)?.Publish(new LibvirtLifecycleDomainEvent(name, uuid, (LibvirtLifecycleEvent)eventType, detail));
        }
        catch (Exception)
        {
            // An exception must not unwind into libvirt's event loop; the event is lost, the loop is not.
        }
        return 0;
    }

    [UnmanagedCallersOnly]
    private static void OnMigrationIteration(nint conn, nint domain, int iteration, nint opaque)
    {
        try
        {
            var (name, uuid) = Interop.Libvirt.DescribeBorrowedDomain(domain);
            FromOpaque(opaque)?.Publish(new LibvirtMigrationIterationDomainEvent(name, uuid, iteration));
        }
        catch (Exception)
        {
            // See OnLifecycle.
        }
    }

    [UnmanagedCallersOnly]
    private static void OnJobCompleted(nint conn, nint domain, Interop.Libvirt.VirTypedParameter* parameters, int count, nint opaque)
    {
        try
        {
            var (name, uuid) = Interop.Libvirt.DescribeBorrowedDomain(domain);
            // libvirt frees the parameters after we return: copy them now.
            var stats = new LibvirtJobStats(LibvirtJobType.Completed, Interop.Libvirt.ReadTypedParams(parameters, count));
            FromOpaque(opaque)?.Publish(new LibvirtJobCompletedDomainEvent(name, uuid, stats));
        }
        catch (Exception)
        {
            // See OnLifecycle.
        }
    }

    [UnmanagedCallersOnly]
    private static void FreeState(nint opaque) => GCHandle.FromIntPtr(opaque).Free();

    /// <summary>Deregisters the callbacks and completes <see cref="Events"/>.</summary>
    public void Dispose()
    {
        if (Interlocked.Exchange(ref _disposed, 1) != 0)
        {
            return;
        }
        try
        {
            foreach (int id in _callbackIds)
            {
                try
                {
                    Interop.Libvirt.ConnectDomainEventDeregisterAny(_connection, id);
                }
                catch (LibvirtException)
                {
                    // The connection is already gone; libvirt has dropped the callbacks with it.
                }
            }
        }
        finally
        {
            _connection.DangerousRelease();
            _channel.Writer.TryComplete();
        }
    }
}
