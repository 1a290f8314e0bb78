namespace BFMig.Native.Libvirt;

/// <summary>
/// VIR_MIGRATE_PARAM_* for virDomainMigrateToURI3. Unset properties are not sent. Use
/// <see cref="Extra"/> for anything not listed (its .NET value type picks the libvirt type).
/// </summary>
public sealed class LibvirtMigrationParameters
{
    /// <summary>VIR_MIGRATE_PARAM_URI ("migrate_uri"), e.g. <c>unix:///run/bfmig/hostB/guest.mig</c>.</summary>
    public string? MigrateUri { get; init; }

    /// <summary>VIR_MIGRATE_PARAM_DISKS_URI ("disks_uri"), e.g. <c>unix:///run/bfmig/hostB/guest.nbd</c>.</summary>
    public string? DisksUri { get; init; }

    /// <summary>VIR_MIGRATE_PARAM_MIGRATE_DISKS ("migrate_disks"), one entry per disk target.</summary>
    public IReadOnlyList<string> MigrateDisks { get; init; } = [];

    /// <summary>VIR_MIGRATE_PARAM_DEST_NAME ("destination_name").</summary>
    public string? DestinationName { get; init; }

    /// <summary>VIR_MIGRATE_PARAM_DEST_XML ("destination_xml").</summary>
    public string? DestinationXml { get; init; }

    /// <summary>VIR_MIGRATE_PARAM_PERSIST_XML ("persistent_xml").</summary>
    public string? PersistentXml { get; init; }

    /// <summary>VIR_MIGRATE_PARAM_BANDWIDTH ("bandwidth") in MiB/s.</summary>
    public ulong? BandwidthMiBps { get; init; }

    /// <summary>VIR_MIGRATE_PARAM_PARALLEL_CONNECTIONS ("parallel.connections").</summary>
    public int? ParallelConnections { get; init; }

    /// <summary>VIR_MIGRATE_PARAM_DISKS_PORT ("disks_port").</summary>
    public int? DisksPort { get; init; }

    /// <summary>Further parameters, sent after the ones above.</summary>
    public IReadOnlyList<LibvirtTypedParameter> Extra { get; init; } = [];

    /// <summary>The parameters in the order they will be passed to libvirt.</summary>
    public IEnumerable<LibvirtTypedParameter> ToTypedParameters()
    {
        if (MigrateUri is not null)
        {
            yield return new("migrate_uri", MigrateUri);
        }
        if (DisksUri is not null)
        {
            yield return new("disks_uri", DisksUri);
        }
        foreach (string disk in MigrateDisks)
        {
            yield return new("migrate_disks", disk);
        }
        if (DestinationName is not null)
        {
            yield return new("destination_name", DestinationName);
        }
        if (DestinationXml is not null)
        {
            yield return new("destination_xml", DestinationXml);
        }
        if (PersistentXml is not null)
        {
            yield return new("persistent_xml", PersistentXml);
        }
        if (BandwidthMiBps is { } bandwidth)
        {
            yield return new("bandwidth", bandwidth);
        }
        if (ParallelConnections is { } connections)
        {
            yield return new("parallel.connections", connections);
        }
        if (DisksPort is { } port)
        {
            yield return new("disks_port", port);
        }
        foreach (LibvirtTypedParameter extra in Extra)
        {
            yield return extra;
        }
    }
}
