using System.Runtime.InteropServices;

namespace BFMig.Native.Libvirt;

/// <summary>virConnectPtr; released with virConnectClose.</summary>
internal sealed class ConnectHandle : SafeHandle
{
    public ConnectHandle() : base(0, ownsHandle: true)
    {
    }

    public override bool IsInvalid => handle == 0;

    protected override bool ReleaseHandle() => Interop.Libvirt.ConnectClose(handle) >= 0;
}

/// <summary>
/// Base for libvirt objects that belong to a connection: the object keeps its connection handle
/// alive (libvirt also refcounts, but our handle must not be closed under a live child).
/// </summary>
internal abstract class ConnectionChildHandle : SafeHandle
{
    private SafeHandle? _parent;

    protected ConnectionChildHandle() : base(0, ownsHandle: true)
    {
    }

    public override bool IsInvalid => handle == 0;

    /// <summary>Ties this handle to the handle it came from; call once, right after creation.</summary>
    internal void KeepAlive(SafeHandle parent)
    {
        bool added = false;
        parent.DangerousAddRef(ref added);
        _parent = parent;
    }

    protected abstract bool Free(nint handle);

    protected override bool ReleaseHandle()
    {
        bool ok = Free(handle);
        _parent?.DangerousRelease();
        _parent = null;
        return ok;
    }
}

/// <summary>virDomainPtr; released with virDomainFree.</summary>
internal sealed class DomainHandle : ConnectionChildHandle
{
    protected override bool Free(nint handle) => Interop.Libvirt.DomainFree(handle) >= 0;
}

/// <summary>virDomainCheckpointPtr; released with virDomainCheckpointFree.</summary>
internal sealed class CheckpointHandle : ConnectionChildHandle
{
    protected override bool Free(nint handle) => Interop.Libvirt.CheckpointFree(handle) >= 0;
}
