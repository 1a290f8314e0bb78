namespace BFMig.Native.Libvirt;

/// <summary>virConnectListAllDomainsFlags.</summary>
[Flags]
public enum LibvirtListDomainsFlags : uint
{
    None = 0,
    Active = 1 << 0,
    Inactive = 1 << 1,
    Persistent = 1 << 2,
    Transient = 1 << 3,
    Running = 1 << 4,
    Paused = 1 << 5,
    Shutoff = 1 << 6,
    Other = 1 << 7,
    HasCheckpoint = 1 << 14,
    NoCheckpoint = 1 << 15,
}

/// <summary>virDomainState.</summary>
public enum LibvirtDomainState
{
    NoState = 0,
    Running = 1,
    Blocked = 2,
    Paused = 3,
    Shutdown = 4,
    Shutoff = 5,
    Crashed = 6,
    PmSuspended = 7,
}

/// <summary>virDomainXMLFlags.</summary>
[Flags]
public enum LibvirtDomainXmlFlags : uint
{
    None = 0,
    Secure = 1 << 0,
    Inactive = 1 << 1,
    UpdateCpu = 1 << 2,
    Migratable = 1 << 3,
}

/// <summary>virDomainUndefineFlagsValues.</summary>
[Flags]
public enum LibvirtUndefineFlags : uint
{
    None = 0,
    ManagedSave = 1 << 0,
    SnapshotsMetadata = 1 << 1,
    Nvram = 1 << 2,
    KeepNvram = 1 << 3,
    CheckpointsMetadata = 1 << 4,
}

/// <summary>virDomainGetJobStatsFlags.</summary>
[Flags]
public enum LibvirtJobStatsFlags : uint
{
    None = 0,
    /// <summary>Statistics of the most recently completed job instead of the running one.</summary>
    Completed = 1 << 0,
    /// <summary>With <see cref="Completed"/>: do not discard them after reading.</summary>
    KeepCompleted = 1 << 1,
}

/// <summary>virDomainJobType.</summary>
public enum LibvirtJobType
{
    None = 0,
    Bounded = 1,
    Unbounded = 2,
    Completed = 3,
    Failed = 4,
    Cancelled = 5,
}

/// <summary>virDomainMigrateFlags.</summary>
[Flags]
public enum LibvirtMigrateFlags : uint
{
    None = 0,
    Live = 1 << 0,
    PeerToPeer = 1 << 1,
    Tunnelled = 1 << 2,
    PersistDestination = 1 << 3,
    UndefineSource = 1 << 4,
    Paused = 1 << 5,
    NonSharedDisk = 1 << 6,
    NonSharedIncremental = 1 << 7,
    ChangeProtection = 1 << 8,
    Unsafe = 1 << 9,
    Offline = 1 << 10,
    Compressed = 1 << 11,
    AbortOnError = 1 << 12,
    AutoConverge = 1 << 13,
    Postcopy = 1 << 15,
    Tls = 1 << 16,
    Parallel = 1 << 17,
}

/// <summary>virDomainCheckpointCreateFlags.</summary>
[Flags]
public enum LibvirtCheckpointCreateFlags : uint
{
    None = 0,
    /// <summary>Restore metadata of a checkpoint that exists in the disk images (after migration).</summary>
    Redefine = 1 << 0,
    Quiesce = 1 << 1,
    RedefineValidate = 1 << 2,
}

/// <summary>virDomainCheckpointListFlags.</summary>
[Flags]
public enum LibvirtCheckpointListFlags : uint
{
    None = 0,
    Roots = 1 << 0,
    Topological = 1 << 1,
    Leaves = 1 << 2,
    NoLeaves = 1 << 3,
}

/// <summary>virDomainCheckpointXMLFlags.</summary>
[Flags]
public enum LibvirtCheckpointXmlFlags : uint
{
    None = 0,
    Secure = 1 << 0,
    NoDomain = 1 << 1,
    Size = 1 << 2,
}

/// <summary>virDomainCheckpointDeleteFlags.</summary>
[Flags]
public enum LibvirtCheckpointDeleteFlags : uint
{
    None = 0,
    Children = 1 << 0,
    /// <summary>Forget libvirt's metadata, keep the bitmaps in the images.</summary>
    MetadataOnly = 1 << 1,
    ChildrenOnly = 1 << 2,
}

/// <summary>virConnectCloseReason.</summary>
public enum LibvirtCloseReason
{
    Error = 0,
    Eof = 1,
    Keepalive = 2,
    Client = 3,
}

/// <summary>virDomainEventType (lifecycle events).</summary>
public enum LibvirtLifecycleEvent
{
    Defined = 0,
    Undefined = 1,
    Started = 2,
    Suspended = 3,
    Resumed = 4,
    Stopped = 5,
    Shutdown = 6,
    PmSuspended = 7,
    Crashed = 8,
}

/// <summary>virDomainEventStartedDetailType: why a guest started.</summary>
public enum LibvirtStartedDetail
{
    Booted = 0,
    Migrated = 1,
    Restored = 2,
    FromSnapshot = 3,
    Wakeup = 4,
    Recreated = 5,
}

/// <summary>virDomainEventSuspendedDetailType: why a guest paused (PostCopy: on the source, the migration switched to post-copy).</summary>
public enum LibvirtSuspendedDetail
{
    Paused = 0,
    Migrated = 1,
    IoError = 2,
    Watchdog = 3,
    Restored = 4,
    FromSnapshot = 5,
    ApiError = 6,
    PostCopy = 7,
    PostCopyFailed = 8,
}

/// <summary>virDomainEventResumedDetailType: why a guest resumed (Migrated: on the destination, or a source whose migration failed).</summary>
public enum LibvirtResumedDetail
{
    Unpaused = 0,
    Migrated = 1,
    FromSnapshot = 2,
    PostCopy = 3,
    PostCopyFailed = 4,
}

/// <summary>virDomainEventStoppedDetailType: why a guest stopped.</summary>
public enum LibvirtStoppedDetail
{
    Shutdown = 0,
    Destroyed = 1,
    Crashed = 2,
    Migrated = 3,
    Saved = 4,
    Failed = 5,
    FromSnapshot = 6,
}
