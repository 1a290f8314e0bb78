using BFMig.Daemon.Logging;
using BFMig.Native.Libvirt;
using Microsoft.Extensions.Logging;

namespace BFMig.Daemon.Guests;

/// <summary>What the daemon does with libvirt's view of the guests.</summary>
public interface IGuestEvents
{
    /// <summary>After every (re)connect: the guests running now (UUID, name).</summary>
    void Reconcile(IReadOnlyCollection<(Guid Uuid, string Name)> running);

    /// <summary>One lifecycle or job-completed event, in libvirt's order.</summary>
    void OnEvent(LibvirtDomainEvent domainEvent);

    /// <summary>
    /// Every <see cref="LibvirtWatcher.AuditInterval"/> on a live connection, after the events that
    /// came before it: the guests running now, so that an event libvirt never delivered is noticed.
    /// False when something looks out of step but may be an event still on its way: the watcher
    /// asks again one poll later.
    /// </summary>
    bool Audit(IReadOnlyCollection<(Guid Uuid, string Name)> running);
}

/// <summary>
/// Follows libvirt's domain events on <c>daemon:libvirt_uri</c>. When the connection breaks
/// (libvirtd restarted, keepalive timeout) it reconnects with a growing delay (up to 10 s) and
/// reconciles, so that events missed in between cannot leave sockets behind or missing; on a
/// connection that stays up, a periodic audit (<see cref="IGuestEvents.Audit"/>) catches the rest.
/// </summary>
public sealed class LibvirtWatcher(string uri, IGuestEvents sink, ILogger logger)
{
    private static readonly TimeSpan MaxDelay = TimeSpan.FromSeconds(10);
    private static readonly TimeSpan AlivePoll = TimeSpan.FromSeconds(5);

    /// <summary>
    /// How often the running guests are compared with what the events built (a connection that
    /// stays up can still lose an event: reconnecting reconciles, this catches the rest).
    /// </summary>
    internal TimeSpan AuditInterval { get; init; } = TimeSpan.FromSeconds(60);
    private volatile LibvirtConnection? _connection;

    /// <summary>True while connected.</summary>
    public bool IsConnected => _connection is { } c && SafeIsAlive(c);

    /// <summary>How many times a connection was established (the first one included).</summary>
    public int Connects { get; private set; }

    /// <summary>Runs until <paramref name="ct"/> is cancelled.</summary>
    public async Task RunAsync(CancellationToken ct)
    {
        var delay = TimeSpan.FromMilliseconds(500);
        while (!ct.IsCancellationRequested)
        {
            LibvirtConnection connection;
            LibvirtDomainEventSubscription subscription;
            try
            {
                connection = LibvirtConnection.Open(uri);
            }
            catch (LibvirtException e)
            {
                DaemonLog.LibvirtConnectFailed(logger, uri, e.LibvirtMessage, delay.TotalSeconds);
                await DelayAsync(delay, ct).ConfigureAwait(false);
                delay = TimeSpan.FromTicks(Math.Min(MaxDelay.Ticks, delay.Ticks * 2));
                continue;
            }
            var lost = new TaskCompletionSource<string>(TaskCreationOptions.RunContinuationsAsynchronously);
            connection.Closed += reason => lost.TrySetResult(reason.ToString());
            try
            {
                connection.SetKeepAlive(5, 3);
                subscription = connection.SubscribeDomainEvents();
            }
            catch (LibvirtException e)
            {
                connection.Dispose();
                DaemonLog.LibvirtConnectFailed(logger, uri, e.LibvirtMessage, delay.TotalSeconds);
                await DelayAsync(delay, ct).ConfigureAwait(false);
                continue;
            }
            delay = TimeSpan.FromMilliseconds(500);
            _connection = connection;
            Connects++;
            string reason;
            try
            {
                var running = ListRunning(connection);
                DaemonLog.LibvirtConnected(logger, uri, running.Count);
                Deliver(() => sink.Reconcile(running), "the reconcile after connecting");
                reason = await PumpAsync(connection, subscription, lost.Task, ct).ConfigureAwait(false);
            }
            catch (LibvirtException e)
            {
                reason = e.LibvirtMessage;
            }
            catch (OperationCanceledException) when (ct.IsCancellationRequested)
            {
                reason = "stopping";
            }
            finally
            {
                _connection = null;
                subscription.Dispose();
                connection.Dispose();
            }
            if (!ct.IsCancellationRequested)
            {
                DaemonLog.LibvirtLost(logger, uri, reason);
                await DelayAsync(delay, ct).ConfigureAwait(false);
            }
        }
    }

    private async Task<string> PumpAsync(LibvirtConnection connection, LibvirtDomainEventSubscription subscription, Task<string> lost, CancellationToken ct)
    {
        var reader = subscription.Events;
        Task<bool>? next = null;
        var audited = Environment.TickCount64;
        while (!ct.IsCancellationRequested)
        {
            next ??= reader.WaitToReadAsync(ct).AsTask();
            var done = await Task.WhenAny(next, lost, Task.Delay(AlivePoll, ct)).ConfigureAwait(false);
            if (done == lost)
                return $"closed: {lost.Result}";
            if (done == next)
            {
                next = null;
                if (!await ((Task<bool>)done).ConfigureAwait(false))
                    return "event subscription ended";
                DeliverQueued(reader);
            }
            else if (!SafeIsAlive(connection))
            {
                return "connection no longer alive";
            }
            if (Environment.TickCount64 - audited >= AuditInterval.TotalMilliseconds)
            {
                // Events already queued go first: the listing must not be compared with a state
                // that is only behind, not wrong.
                DeliverQueued(reader);
                var running = ListRunning(connection);
                var settled = true;
                Deliver(() => settled = sink.Audit(running), "the audit of the sockets");
                audited = Environment.TickCount64 - (settled ? 0 : (long)(AuditInterval - AlivePoll).TotalMilliseconds);
            }
        }
        return "stopping";
    }

    private void DeliverQueued(System.Threading.Channels.ChannelReader<LibvirtDomainEvent> reader)
    {
        while (reader.TryRead(out var domainEvent))
            Deliver(() => sink.OnEvent(domainEvent), $"{domainEvent.GetType().Name} of guest {domainEvent.DomainName}");
    }

    // One event the daemon could not handle (a bug, a state file it could not read) must not end
    // the following of libvirt: the events after it and the audit still come. A lost connection
    // (LibvirtException) goes on to the reconnect; a failure to run at all (a library that cannot
    // be loaded, memory) ends the watcher, and with it the daemon (BfmigDaemon.Supervise).
    private void Deliver(Action handle, string what)
    {
        try
        {
            handle();
        }
        catch (Exception e) when (e is not LibvirtException && !Failures.IsFatal(e))
        {
            DaemonLog.GuestEventFailed(logger, what, e.Message, e);
        }
    }

    /// <summary>The name of the guest with <paramref name="uuid"/>, null when libvirt has no such guest or is unreachable.</summary>
    public bool? IsDefined(Guid uuid)
    {
        var connection = _connection;
        if (connection is null || !IsConnected)
            return null;
        try
        {
            using var domain = connection.TryLookupDomainByUuid(uuid.ToString("D"));
            return domain is not null;
        }
        catch (LibvirtException)
        {
            return null;
        }
    }

    /// <summary>The guest's name, null when libvirt does not know it or cannot be asked.</summary>
    public string? LookupName(Guid uuid)
    {
        var connection = _connection;
        if (connection is null)
            return null;
        try
        {
            using var domain = connection.TryLookupDomainByUuid(uuid.ToString("D"));
            return domain?.Name;
        }
        catch (LibvirtException)
        {
            return null;
        }
    }

    /// <summary>The guest's live domain XML (its inactive one when it does not run), null when libvirt has no such guest or is unreachable.</summary>
    public string? GetXml(Guid uuid)
    {
        using var domain = OpenDomain(uuid);
        try
        {
            return domain?.GetXmlDesc();
        }
        catch (LibvirtException)
        {
            return null;
        }
    }

    /// <summary>The guest's domain (the caller disposes it), null when libvirt has no such guest or is unreachable.</summary>
    public LibvirtDomain? OpenDomain(Guid uuid)
    {
        var connection = _connection;
        if (connection is null)
            return null;
        try
        {
            return connection.TryLookupDomainByUuid(uuid.ToString("D"));
        }
        catch (LibvirtException)
        {
            return null;
        }
    }

    /// <summary>The guest called (or with the UUID) <paramref name="nameOrUuid"/>: UUID, name and whether it runs, null when unknown.</summary>
    public (Guid Uuid, string Name, bool Running)? Lookup(string nameOrUuid)
    {
        var connection = _connection;
        if (connection is null)
            return null;
        try
        {
            using var domain = Guid.TryParse(nameOrUuid, out var uuid)
                ? connection.TryLookupDomainByUuid(uuid.ToString("D"))
                : connection.TryLookupDomainByName(nameOrUuid);
            return domain is null ? null : (Guid.Parse(domain.Uuid), domain.Name, domain.IsActive);
        }
        catch (LibvirtException)
        {
            return null;
        }
    }

    /// <summary>
    /// The guest's state here: null when libvirt is unreachable, <see cref="LibvirtDomainState.Shutoff"/>
    /// when the guest is not defined or not running.
    /// </summary>
    public LibvirtDomainState? GetState(Guid uuid)
    {
        var connection = _connection;
        if (connection is null)
            return null;
        try
        {
            using var domain = connection.TryLookupDomainByUuid(uuid.ToString("D"));
            return domain is null || !domain.IsActive ? LibvirtDomainState.Shutoff : domain.GetState().State;
        }
        catch (LibvirtException e) when (e.Code == LibvirtErrorCode.NoDomain)
        {
            return LibvirtDomainState.Shutoff;
        }
        catch (LibvirtException)
        {
            return null;
        }
    }

    private static List<(Guid, string)> ListRunning(LibvirtConnection connection)
    {
        var result = new List<(Guid, string)>();
        foreach (var domain in connection.ListAllDomains(LibvirtListDomainsFlags.Active))
        {
            using (domain)
                result.Add((Guid.Parse(domain.Uuid), domain.Name));
        }
        return result;
    }

    private static bool SafeIsAlive(LibvirtConnection connection)
    {
        try
        {
            return connection.IsAlive;
        }
        catch (Exception e) when (e is LibvirtException or ObjectDisposedException)
        {
            return false;
        }
    }

    private static async Task DelayAsync(TimeSpan delay, CancellationToken ct)
    {
        try
        {
            await Task.Delay(delay, ct).ConfigureAwait(false);
        }
        catch (OperationCanceledException)
        {
            // Stopping: the loop condition ends the watcher.
        }
    }
}
