namespace BFMig.Transfer.Disk.Nbd;

/// <summary>Counters of one <see cref="NbdSenderFilter"/> run (updated by the filter, readable any time).</summary>
public sealed class NbdFilterStats
{
    private long _bytesForwarded;
    private long _bytesElided;
    private long _blocksForwarded;
    private long _blocksElided;
    private long _blocksZeroed;
    private long _zeroBlocksElided;
    private long _zeroBlocksDeferred;
    private long _zeroBlocksMaterialized;
    private long _partialBlocks;
    private long _requests;

    /// <summary>WRITE payload bytes sent upstream.</summary>
    public long BytesForwarded => Volatile.Read(ref _bytesForwarded);

    /// <summary>WRITE payload bytes answered locally because the target already held them.</summary>
    public long BytesElided => Volatile.Read(ref _bytesElided);

    /// <summary>Whole blocks of WRITE data sent upstream.</summary>
    public long BlocksForwarded => Volatile.Read(ref _blocksForwarded);

    /// <summary>Whole blocks of WRITE data elided.</summary>
    public long BlocksElided => Volatile.Read(ref _blocksElided);

    /// <summary>Whole blocks zeroed upstream (forwarded WRITE_ZEROES, including deferred ones sent later).</summary>
    public long BlocksZeroed => Volatile.Read(ref _blocksZeroed);

    /// <summary>Whole blocks of WRITE_ZEROES elided because the target block already reads as zero.</summary>
    public long ZeroBlocksElided => Volatile.Read(ref _zeroBlocksElided);

    /// <summary>Whole blocks of WRITE_ZEROES held back (pending) because the target still holds non-zero data a later WRITE may match.</summary>
    public long ZeroBlocksDeferred => Volatile.Read(ref _zeroBlocksDeferred);

    /// <summary>Pending zero blocks that were finally sent upstream (no later WRITE covered them).</summary>
    public long ZeroBlocksMaterialized => Volatile.Read(ref _zeroBlocksMaterialized);

    /// <summary>Block pieces forwarded because a write covered only part of a block.</summary>
    public long PartialBlocks => Volatile.Read(ref _partialBlocks);

    /// <summary>Requests received from the client.</summary>
    public long Requests => Volatile.Read(ref _requests);

    internal void AddForwarded(long bytes, long blocks)
    {
        Interlocked.Add(ref _bytesForwarded, bytes);
        Interlocked.Add(ref _blocksForwarded, blocks);
    }

    internal void AddElided(long bytes)
    {
        Interlocked.Add(ref _bytesElided, bytes);
        Interlocked.Increment(ref _blocksElided);
    }

    internal void AddZeroed(long blocks) => Interlocked.Add(ref _blocksZeroed, blocks);

    internal void AddZeroElided() => Interlocked.Increment(ref _zeroBlocksElided);

    internal void AddZeroDeferred() => Interlocked.Increment(ref _zeroBlocksDeferred);

    internal void AddZeroMaterialized(long blocks) => Interlocked.Add(ref _zeroBlocksMaterialized, blocks);

    internal void AddPartial() => Interlocked.Increment(ref _partialBlocks);

    internal void AddRequest() => Interlocked.Increment(ref _requests);

    /// <inheritdoc/>
    public override string ToString() =>
        $"requests={Requests} forwarded={BytesForwarded}B/{BlocksForwarded}blk elided={BytesElided}B/{BlocksElided}blk " +
        $"zeroed={BlocksZeroed}blk zero-elided={ZeroBlocksElided} zero-deferred={ZeroBlocksDeferred} zero-materialized={ZeroBlocksMaterialized} partial={PartialBlocks}";
}

/// <summary>What one filter run saw and how it ended.</summary>
/// <param name="ExportSize">Size of the export the server announced.</param>
/// <param name="Style">Negotiated header style.</param>
/// <param name="CleanDisconnect">True when the client sent NBD_CMD_DISC after all its requests were answered.</param>
/// <param name="Opaque">True when the stream was carried as opaque bytes (after STARTTLS): nothing elided, nothing known.</param>
public sealed record NbdFilterResult(ulong ExportSize, NbdHeaderStyle Style, bool CleanDisconnect, bool Opaque);

/// <summary>Tunables of <see cref="NbdSenderFilter"/>.</summary>
public sealed class NbdSenderFilterOptions
{
    /// <summary>Largest WRITE or READ payload accepted (QEMU's NBD_MAX_BUFFER_SIZE is 32 MiB).</summary>
    public int MaxPayload { get; init; } = 32 << 20;

    /// <summary>Largest WRITE_ZEROES the filter issues when it sends deferred zeroes.</summary>
    public uint MaxZeroRequest { get; init; } = 64 << 20;

    /// <summary>How long to wait for outstanding replies and the upstream close after the client left.</summary>
    public TimeSpan DrainTimeout { get; init; } = TimeSpan.FromSeconds(30);

    /// <summary>
    /// The virtual size of this host's disk behind an export name (null when not known). The
    /// peer's server may declare any export size, and the map costs about 17 bytes per block of
    /// it: an export larger than the disk it mirrors is refused before anything is allocated.
    /// </summary>
    public Func<string, ulong?>? SourceDiskSize { get; init; }

    /// <summary>
    /// Called with the byte range of every WRITE, WRITE_ZEROES and TRIM just before it goes
    /// upstream (synchronously: the target must not change before the range is journaled, see
    /// <see cref="DiskDoubtJournal"/>).
    /// </summary>
    public Action<ulong, ulong>? Touching { get; init; }
}
