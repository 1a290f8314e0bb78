namespace BFMig.Native.Libvirt;

/// <summary>
/// virDomainGetJobStats result: the job type plus every field libvirt returned. The typed
/// properties are the VIR_DOMAIN_JOB_* fields BFMig uses; null when libvirt did not report one.
/// </summary>
public sealed class LibvirtJobStats
{
    internal LibvirtJobStats(LibvirtJobType type, IReadOnlyList<LibvirtTypedParameter> fields)
    {
        Type = type;
        Fields = fields;
        var byName = new Dictionary<string, object>(StringComparer.Ordinal);
        foreach (LibvirtTypedParameter field in fields)
        {
            byName.TryAdd(field.Name, field.Value);
        }
        ByName = byName;
    }

    /// <summary>The job type (None when no job runs or no completed stats are kept).</summary>
    public LibvirtJobType Type { get; }

    /// <summary>Every field, in libvirt's order.</summary>
    public IReadOnlyList<LibvirtTypedParameter> Fields { get; }

    /// <summary>Fields by name (first occurrence).</summary>
    public IReadOnlyDictionary<string, object> ByName { get; }

    /// <summary>A numeric field by its libvirt name, whatever integer type libvirt used.</summary>
    public ulong? GetUInt64(string name) =>
        ByName.TryGetValue(name, out object? value) ? new LibvirtTypedParameter(name, value).AsUInt64() : null;

    public ulong? TimeElapsedMs => GetUInt64("time_elapsed");
    public ulong? DowntimeMs => GetUInt64("downtime");
    public ulong? DowntimeNetMs => GetUInt64("downtime_net");
    public ulong? SetupTimeMs => GetUInt64("setup_time");
    public ulong? DataTotal => GetUInt64("data_total");
    public ulong? DataProcessed => GetUInt64("data_processed");
    public ulong? DataRemaining => GetUInt64("data_remaining");
    public ulong? MemoryTotal => GetUInt64("memory_total");
    public ulong? MemoryProcessed => GetUInt64("memory_processed");
    public ulong? MemoryRemaining => GetUInt64("memory_remaining");
    public ulong? MemoryConstant => GetUInt64("memory_constant");
    public ulong? MemoryNormal => GetUInt64("memory_normal");
    public ulong? MemoryBps => GetUInt64("memory_bps");
    public ulong? MemoryDirtyRate => GetUInt64("memory_dirty_rate");
    public ulong? MemoryIteration => GetUInt64("memory_iteration");
    public ulong? DiskTotal => GetUInt64("disk_total");
    public ulong? DiskProcessed => GetUInt64("disk_processed");
    public ulong? DiskRemaining => GetUInt64("disk_remaining");
    public ulong? DiskBps => GetUInt64("disk_bps");

    /// <summary>VIR_DOMAIN_JOB_OPERATION (virDomainJobOperation), when reported.</summary>
    public int? Operation => ByName.TryGetValue("operation", out object? v) && v is int i ? i : null;

    /// <summary>VIR_DOMAIN_JOB_SUCCESS, when reported (completed jobs).</summary>
    public bool? Success => ByName.TryGetValue("success", out object? v) && v is bool b ? b : null;

    /// <summary>VIR_DOMAIN_JOB_ERRMSG, when reported (failed jobs).</summary>
    public string? ErrorMessage => ByName.TryGetValue("errmsg", out object? v) ? v as string : null;
}
