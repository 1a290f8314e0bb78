using System.Runtime.InteropServices;

namespace BFMig.Native.Libvirt;

/// <summary>
/// A libvirt connection (virConnectPtr). Thread-safe as libvirt connections are; each call
/// throws <see cref="LibvirtException"/> with libvirt's error code when it fails.
/// </summary>
public sealed unsafe class LibvirtConnection : IDisposable
{
    private readonly ConnectHandle _handle;
    private GCHandle _closeState;

    private LibvirtConnection(ConnectHandle handle) => _handle = handle;

    internal ConnectHandle Handle => _handle;

    /// <summary>
    /// Raised on the libvirt event-loop thread when libvirt closes the connection on its own
    /// (peer gone, keepalive timeout). Keep handlers short; reconnect elsewhere.
    /// </summary>
    public event Action<LibvirtCloseReason>? Closed;

    /// <summary>
    /// Opens <paramref name="uri"/> (e.g. <c>qemu:///system</c>, <c>test:///default</c>). Starts the
    /// libvirt event loop first, as libvirt requires for events and keepalive.
    /// </summary>
    public static LibvirtConnection Open(string uri, bool readOnly = false)
    {
        ArgumentException.ThrowIfNullOrEmpty(uri);
        LibvirtEventLoop.EnsureStarted();
        var connection = new LibvirtConnection(Interop.Libvirt.ConnectOpen(uri, readOnly));
        connection.RegisterCloseCallback();
        return connection;
    }

    /// <summary>The canonical URI of this connection.</summary>
    public string Uri => Interop.Libvirt.ConnectGetUri(_handle);

    /// <summary>The host name of the hypervisor host.</summary>
    public string Hostname => Interop.Libvirt.ConnectGetHostname(_handle);

    /// <summary>libvirt version of the other end (major * 1,000,000 + minor * 1,000 + release).</summary>
    public ulong LibVersion => Interop.Libvirt.ConnectGetLibVersion(_handle);

    /// <summary>False once libvirt considers the connection dead.</summary>
    public bool IsAlive => Interop.Libvirt.ConnectIsAlive(_handle);

    /// <summary>
    /// Enables keepalive probes: the connection is closed (see <see cref="Closed"/>) after
    /// <paramref name="count"/> unanswered probes sent every <paramref name="intervalSeconds"/>.
    /// Returns false when the driver has no keepalive (local drivers).
    /// </summary>
    public bool SetKeepAlive(int intervalSeconds, uint count) => Interop.Libvirt.ConnectSetKeepAlive(_handle, intervalSeconds, count);

    public LibvirtDomain LookupDomainByName(string name) => new(Interop.Libvirt.DomainLookupByName(_handle, name));

    /// <summary>Looks a domain up by its UUID string (any case, with dashes).</summary>
    public LibvirtDomain LookupDomainByUuid(string uuid) => new(Interop.Libvirt.DomainLookupByUuidString(_handle, uuid));

    /// <summary>Like <see cref="LookupDomainByName"/> but null when there is no such domain.</summary>
    public LibvirtDomain? TryLookupDomainByName(string name)
    {
        try
        {
            return LookupDomainByName(name);
        }
        catch (LibvirtException e) when (e.Code == LibvirtErrorCode.NoDomain)
        {
            return null;
        }
    }

    /// <summary>Like <see cref="LookupDomainByUuid"/> but null when there is no such domain.</summary>
    public LibvirtDomain? TryLookupDomainByUuid(string uuid)
    {
        try
        {
            return LookupDomainByUuid(uuid);
        }
        catch (LibvirtException e) when (e.Code == LibvirtErrorCode.NoDomain)
        {
            return null;
        }
    }

    /// <summary>All domains matching <paramref name="flags"/> (None = all). Dispose each.</summary>
    public IReadOnlyList<LibvirtDomain> ListAllDomains(LibvirtListDomainsFlags flags = LibvirtListDomainsFlags.None) =>
        Array.ConvertAll(Interop.Libvirt.ConnectListAllDomains(_handle, (uint)flags), h => new LibvirtDomain(h));

    /// <summary>Defines (or redefines) a persistent domain from XML.</summary>
    public LibvirtDomain DefineDomain(string xml) => new(Interop.Libvirt.DomainDefineXml(_handle, xml, 0));

    /// <summary>Creates and starts a transient domain from XML.</summary>
    public LibvirtDomain CreateTransientDomain(string xml) => new(Interop.Libvirt.DomainCreateXml(_handle, xml, 0));

    /// <summary>Subscribes to lifecycle, migration-iteration and job-completed events of all domains.</summary>
    public LibvirtDomainEventSubscription SubscribeDomainEvents() => new(_handle);

    private void RegisterCloseCallback()
    {
        GCHandle state = GCHandle.Alloc(this, GCHandleType.Weak);
        try
        {
            Interop.Libvirt.ConnectRegisterCloseCallback(_handle, &OnClosed, GCHandle.ToIntPtr(state), &FreeCloseState);
            _closeState = state;
        }
        catch (LibvirtException)
        {
            // Drivers without a close notion (none today) refuse; the connection still works.
            state.Free();
        }
    }

    [UnmanagedCallersOnly]
    private static void OnClosed(nint conn, int reason, nint opaque)
    {
        try
        {
            if (GCHandle.FromIntPtr(opaque).Target is LibvirtConnection connection)
            {
                connection.Closed?.Invoke((LibvirtCloseReason)reason);
            }
        }
        catch (Exception)
        {
            // Never unwind into libvirt's event loop.
        }
    }

    [UnmanagedCallersOnly]
    private static void FreeCloseState(nint opaque) => GCHandle.FromIntPtr(opaque).Free();

    /// <summary>Closes the connection (libvirt keeps it open while domain handles from it live).</summary>
    public void Dispose()
    {
        if (_handle.IsClosed)
        {
            return;
        }
        if (_closeState.IsAllocated)
        {
            try
            {
                Interop.Libvirt.ConnectUnregisterCloseCallback(_handle, &OnClosed);
            }
            catch (LibvirtException)
            {
                // Already unregistered by libvirt (connection lost); the free callback ran or will run.
            }
            _closeState = default;
        }
        _handle.Dispose();
    }
}
