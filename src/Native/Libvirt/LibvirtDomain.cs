namespace BFMig.Native.Libvirt;

/// <summary>A libvirt domain (virDomainPtr). Keeps its connection open until disposed.</summary>
public sealed class LibvirtDomain : IDisposable
{
    private readonly DomainHandle _handle;
    private string? _name;
    private string? _uuid;

    internal LibvirtDomain(DomainHandle handle) => _handle = handle;

    /// <summary>The domain name, read once (after virDomainRename, look the domain up again).</summary>
    public string Name => _name ??= Interop.Libvirt.DomainGetName(_handle);

    /// <summary>The UUID as libvirt prints it (lower case, with dashes).</summary>
    public string Uuid => _uuid ??= Interop.Libvirt.DomainGetUuidString(_handle);

    /// <summary>The hypervisor id, -1 when the domain is not running.</summary>
    public int Id => Interop.Libvirt.DomainGetId(_handle);

    public bool IsActive => Interop.Libvirt.DomainIsActive(_handle);

    public bool IsPersistent => Interop.Libvirt.DomainIsPersistent(_handle);

    public string GetXmlDesc(LibvirtDomainXmlFlags flags = LibvirtDomainXmlFlags.None) => Interop.Libvirt.DomainGetXmlDesc(_handle, (uint)flags);

    /// <summary>State and its reason (the reason is the per-state virDomain*Reason value).</summary>
    public (LibvirtDomainState State, int Reason) GetState()
    {
        var (state, reason) = Interop.Libvirt.DomainGetState(_handle);
        return ((LibvirtDomainState)state, reason);
    }

    /// <summary>Starts a defined domain.</summary>
    public void Start() => Interop.Libvirt.DomainCreate(_handle, 0);

    /// <summary>Stops the domain immediately (power off).</summary>
    public void Destroy() => Interop.Libvirt.DomainDestroy(_handle, 0);

    /// <summary>Asks the guest to shut down.</summary>
    public void Shutdown() => Interop.Libvirt.DomainShutdown(_handle);

    public void Suspend() => Interop.Libvirt.DomainSuspend(_handle);

    public void Resume() => Interop.Libvirt.DomainResume(_handle);

    /// <summary>Removes the persistent definition (a running domain becomes transient).</summary>
    public void Undefine(LibvirtUndefineFlags flags = LibvirtUndefineFlags.None) => Interop.Libvirt.DomainUndefine(_handle, (uint)flags);

    /// <summary>virDomainGetJobStats: the running job, or with <see cref="LibvirtJobStatsFlags.Completed"/> the last completed one.</summary>
    public LibvirtJobStats GetJobStats(LibvirtJobStatsFlags flags = LibvirtJobStatsFlags.None)
    {
        var (type, fields) = Interop.Libvirt.DomainGetJobStats(_handle, (uint)flags);
        return new LibvirtJobStats((LibvirtJobType)type, fields);
    }

    /// <summary>Aborts the running job (e.g. a migration); the guest stays where it is.</summary>
    public void AbortJob() => Interop.Libvirt.DomainAbortJob(_handle);

    /// <summary>Sets the maximum tolerable downtime of the running migration.</summary>
    public void SetMigrationMaxDowntime(TimeSpan downtime) =>
        Interop.Libvirt.DomainMigrateSetMaxDowntime(_handle, (ulong)downtime.TotalMilliseconds);

    /// <summary>
    /// virDomainMigrateToURI3. With <see cref="LibvirtMigrateFlags.PeerToPeer"/>,
    /// <paramref name="destinationUri"/> is the destination libvirt URI (e.g. <c>qemu+ssh://hostB/system</c>).
    /// Blocks until the migration ends; watch it from another thread with <see cref="GetJobStats"/>.
    /// </summary>
    public void MigrateToUri3(string? destinationUri, LibvirtMigrationParameters parameters, LibvirtMigrateFlags flags)
    {
        ArgumentNullException.ThrowIfNull(parameters);
        using var list = new Interop.Libvirt.TypedParameterList();
        foreach (LibvirtTypedParameter parameter in parameters.ToTypedParameters())
        {
            list.Add(parameter);
        }
        Interop.Libvirt.DomainMigrateToUri3(_handle, destinationUri, list, (uint)flags);
    }

    /// <summary>
    /// virDomainMigrate: a managed, non-peer-to-peer migration driven by this process over two
    /// connections (this domain's and <paramref name="destination"/>), as virt-manager makes it.
    /// <paramref name="uri"/> is where the source QEMU sends the stream (<c>tcp://HOST[:PORT]</c>, or
    /// <c>unix:///PATH</c> for BFMig's socket); null lets the destination's libvirt choose its own
    /// address (qemu.conf <c>migration_host</c>) and port. Blocks until the migration ends and
    /// returns the domain on the destination (dispose it).
    /// </summary>
    public LibvirtDomain Migrate(LibvirtConnection destination, LibvirtMigrateFlags flags, string? uri = null,
        string? destinationName = null, ulong bandwidthMiBps = 0)
    {
        ArgumentNullException.ThrowIfNull(destination);
        return new LibvirtDomain(Interop.Libvirt.DomainMigrate(_handle, destination.Handle, (uint)flags, destinationName, uri, bandwidthMiBps));
    }

    /// <summary>Creates a checkpoint from XML, or with <see cref="LibvirtCheckpointCreateFlags.Redefine"/> restores its metadata.</summary>
    public LibvirtCheckpoint CreateCheckpoint(string xml, LibvirtCheckpointCreateFlags flags = LibvirtCheckpointCreateFlags.None) =>
        new(Interop.Libvirt.CheckpointCreateXml(_handle, xml, (uint)flags), _handle);

    public LibvirtCheckpoint LookupCheckpoint(string name) => new(Interop.Libvirt.CheckpointLookupByName(_handle, name), _handle);

    /// <summary>All checkpoints (with <see cref="LibvirtCheckpointListFlags.Topological"/>, parents before children). Dispose each.</summary>
    public IReadOnlyList<LibvirtCheckpoint> ListAllCheckpoints(LibvirtCheckpointListFlags flags = LibvirtCheckpointListFlags.None) =>
        Array.ConvertAll(Interop.Libvirt.DomainListAllCheckpoints(_handle, (uint)flags), h => new LibvirtCheckpoint(h, _handle));

    /// <summary>
    /// Sends a QMP command (JSON text) to the domain's QEMU through libvirt-qemu and returns the
    /// reply JSON. libvirt marks the domain as tainted; use for reads and for what libvirt cannot do.
    /// </summary>
    public string QemuMonitorCommand(string command, bool humanMonitor = false) =>
        Interop.Libvirt.DomainQemuMonitorCommand(_handle, command, humanMonitor ? 1u : 0u);

    public void Dispose() => _handle.Dispose();
}
