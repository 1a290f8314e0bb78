using System.Runtime.InteropServices;

namespace BFMig.Native.Libvirt;

/// <summary>A domain checkpoint (virDomainCheckpointPtr). Keeps its domain handle alive until disposed.</summary>
public sealed class LibvirtCheckpoint : IDisposable
{
    private readonly CheckpointHandle _handle;
    private readonly SafeHandle _domain;

    internal LibvirtCheckpoint(CheckpointHandle handle, SafeHandle domain)
    {
        _handle = handle;
        _domain = domain;
    }

    public string Name => Interop.Libvirt.CheckpointGetName(_handle);

    /// <summary>The checkpoint XML, to be carried to another host and redefined there.</summary>
    public string GetXmlDesc(LibvirtCheckpointXmlFlags flags = LibvirtCheckpointXmlFlags.None) =>
        Interop.Libvirt.CheckpointGetXmlDesc(_handle, (uint)flags);

    /// <summary>The parent checkpoint, or null for a root.</summary>
    public LibvirtCheckpoint? GetParent()
    {
        CheckpointHandle? parent = Interop.Libvirt.CheckpointGetParent(_handle, _domain);
        return parent is null ? null : new LibvirtCheckpoint(parent, _domain);
    }

    /// <summary>Deletes the checkpoint (with <see cref="LibvirtCheckpointDeleteFlags.MetadataOnly"/>, only libvirt's record of it).</summary>
    public void Delete(LibvirtCheckpointDeleteFlags flags = LibvirtCheckpointDeleteFlags.None) =>
        Interop.Libvirt.CheckpointDelete(_handle, (uint)flags);

    public void Dispose() => _handle.Dispose();
}
