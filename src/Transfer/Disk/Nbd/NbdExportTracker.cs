namespace BFMig.Transfer.Disk.Nbd;

/// <summary>
/// What one NBD connection agreed on (export size, flags, header style) and what the target image
/// holds block by block. The sender's <see cref="NbdSenderFilter"/> and the receiver's
/// <see cref="NbdStreamObserver"/> each keep one and feed it the same events; the digests of the
/// maps they report decide what later trips elide, so this is the one place those rules live.
/// Not thread-safe: the owner serializes calls.
/// </summary>
internal sealed class NbdExportTracker
{
    private readonly IDiskBlockView _retained;
    private UInt128[] _hash = [];
    private bool[] _known = [];
    private UInt128 _zeroFull;
    private UInt128 _zeroTail;

    /// <summary>
    /// Creates a tracker whose map starts as <paramref name="retained"/> (the view's key may still
    /// change until transmission starts).
    /// </summary>
    public NbdExportTracker(IDiskBlockView retained)
    {
        ArgumentNullException.ThrowIfNull(retained);
        _retained = retained;
    }

    /// <summary>
    /// Largest export accepted. The sender sets it to its own disk's size once the client named
    /// the export: a peer's server declaring more is refused before anything is allocated for it.
    /// </summary>
    public ulong MaxExportSize { get; set; } = ulong.MaxValue;

    /// <summary>Export size learnt from the handshake (0 before).</summary>
    public ulong ExportSize { get; private set; }

    /// <summary>Transmission flags learnt with the export size.</summary>
    public NbdTransmissionFlags ExportFlags { get; private set; }

    /// <summary>Negotiated header style.</summary>
    public NbdHeaderStyle Style { get; private set; } = NbdHeaderStyle.Compact;

    /// <summary>True once transmission started (the map exists).</summary>
    public bool Transmitting { get; private set; }

    /// <summary>Block size of the map (the retained view's).</summary>
    public int BlockSize => _retained.BlockSize;

    /// <summary>Key the blocks are hashed under, final once transmission started.</summary>
    public DiskHashKey Key { get; private set; } = DiskHashKey.Unkeyed;

    /// <summary>Blocks of the export.</summary>
    public long BlockCount { get; private set; }

    /// <summary>The export's size and flags, from NBD_INFO_EXPORT or NBD_OPT_EXPORT_NAME's reply.</summary>
    public void OnExportInfo(ulong size, NbdTransmissionFlags flags)
    {
        ExportSize = size;
        ExportFlags = flags;
    }

    /// <summary>
    /// Applies a well-formed reply to <paramref name="option"/> (the caller checked that the reply
    /// names it) and says where the handshake goes next.
    /// </summary>
    public NbdOptionStep OnOptionReply(NbdOption option, in NbdOptionReply reply, long at)
    {
        if (reply.Type == NbdOptionReplyType.Info && option is NbdOption.Go or NbdOption.Info
            && NbdHandshake.TryParseExportInfo(reply.Data, at + NbdHandshake.OptionReplyHeaderLength, out ulong size, out var flags))
            OnExportInfo(size, flags);
        if (!reply.IsFinal)
            return NbdOptionStep.MoreReplies;
        if (reply.Type != NbdOptionReplyType.Ack)
            return NbdOptionStep.Done;
        switch (option)
        {
            case NbdOption.StructuredReply when Style == NbdHeaderStyle.Compact:
                Style = NbdHeaderStyle.Structured;
                return NbdOptionStep.Done;
            case NbdOption.ExtendedHeaders:
                Style = NbdHeaderStyle.Extended;
                return NbdOptionStep.Done;
            case NbdOption.Go:
                return NbdOptionStep.Transmission;
            case NbdOption.StartTls:
                return NbdOptionStep.Opaque;
            case NbdOption.Abort:
                return NbdOptionStep.Aborted;
            default:
                return NbdOptionStep.Done;
        }
    }

    /// <summary>
    /// Builds the map for the agreed export: the retained hashes when the image kept its size,
    /// else all unknown (it was resized: nothing can be trusted block by block).
    /// Throws <see cref="NbdProtocolException"/> for an export no map may hold.
    /// </summary>
    public void StartTransmission()
    {
        if (ExportSize > MaxExportSize)
            throw new NbdProtocolException($"NBD export of {ExportSize} bytes declared by the peer's server is larger than the source disk ({MaxExportSize} bytes)");
        int blockSize = _retained.BlockSize;
        long count = DiskBlockHash.CountBlocks(ExportSize, blockSize);
        if (count > DiskBlockMap.MaxBlockCount)
            throw new NbdProtocolException($"NBD export of {ExportSize} bytes has more than {DiskBlockMap.MaxBlockCount} blocks");
        BlockCount = count;
        _hash = new UInt128[count];
        _known = new bool[count];
        Key = _retained.HashKey;
        _zeroFull = DiskBlockHash.Zero(blockSize, Key);
        int tail = count == 0 ? blockSize : DiskBlockHash.BlockLength(count - 1, ExportSize, blockSize);
        _zeroTail = tail == blockSize ? _zeroFull : DiskBlockHash.Zero(tail, Key);
        Transmitting = true;
        if (_retained.ImageSize != ExportSize)
            return;
        for (long b = 0; b < count; b++)
        {
            if (_retained.TryGetHash(b, out var h))
            {
                _hash[b] = h;
                _known[b] = true;
            }
        }
    }

    /// <summary>First byte of <paramref name="block"/>.</summary>
    public ulong BlockStart(long block) => (ulong)block * (ulong)_retained.BlockSize;

    /// <summary>End (exclusive) of <paramref name="block"/>; the last block may be short.</summary>
    public ulong BlockEnd(long block) => Math.Min(BlockStart(block) + (ulong)_retained.BlockSize, ExportSize);

    /// <summary>True when a request of <paramref name="length"/> bytes at <paramref name="offset"/> lies inside the export.</summary>
    public bool InRange(ulong offset, ulong length) => length > 0 && offset <= ExportSize && length <= ExportSize - offset;

    /// <summary>Hash of <paramref name="block"/> when it reads as zeroes.</summary>
    public UInt128 ZeroHash(long block) => block == BlockCount - 1 ? _zeroTail : _zeroFull;

    /// <summary>Hash of a whole block's new content.</summary>
    public UInt128 HashBlock(ReadOnlySpan<byte> content) => DiskBlockHash.Compute(content, Key);

    /// <summary>True when the target is known to hold <paramref name="block"/> with hash <paramref name="hash"/>.</summary>
    public bool Holds(long block, UInt128 hash) => _known[block] && _hash[block] == hash;

    /// <summary>True when the target's content of <paramref name="block"/> is known.</summary>
    public bool IsKnown(long block) => _known[block];

    /// <summary>The target's content of blocks [first, first + count) is not known (a write under way, failed, or partial).</summary>
    public void Forget(long first, long count = 1) => Array.Fill(_known, false, (int)first, (int)count);

    /// <summary>Applies what a request did to target blocks once the server answered it.</summary>
    public void Apply(BlockCommit commit, bool succeeded)
    {
        for (long block = commit.First; block < commit.First + commit.Count; block++)
        {
            if (!succeeded || commit.Kind == BlockCommitKind.Unknown)
            {
                _known[block] = false;
                continue;
            }
            _hash[block] = commit.Kind == BlockCommitKind.Zero ? ZeroHash(block) : commit.Hash;
            _known[block] = true;
        }
    }

    /// <summary>
    /// Reports the map to <paramref name="recorder"/>. Without transmission nothing is known of
    /// the target, which keeps the retained geometry when the declared export is unknown, larger
    /// than any map may hold, or refused.
    /// </summary>
    public void Report(IDiskRecorder recorder, bool clean)
    {
        ArgumentNullException.ThrowIfNull(recorder);
        if (!Transmitting)
        {
            bool refused = ExportSize == 0 || ExportSize > MaxExportSize || !DiskBlockMap.CanDescribe(ExportSize, _retained.BlockSize);
            recorder.BeginTrip(refused ? _retained.ImageSize : ExportSize, _retained.BlockSize, _retained.HashKey);
            recorder.EndTrip(false);
            return;
        }
        recorder.BeginTrip(ExportSize, _retained.BlockSize, Key);
        for (long b = 0; b < BlockCount; b++)
            recorder.RecordBlock(b, _known[b] ? _hash[b] : null);
        recorder.EndTrip(clean);
    }
}

/// <summary>Where the NBD handshake goes after an option reply.</summary>
internal enum NbdOptionStep
{
    /// <summary>More replies to the same option follow.</summary>
    MoreReplies,

    /// <summary>The option is answered; the client may send another.</summary>
    Done,

    /// <summary>NBD_OPT_GO succeeded: transmission starts.</summary>
    Transmission,

    /// <summary>STARTTLS succeeded: the rest of the stream is encrypted.</summary>
    Opaque,

    /// <summary>NBD_OPT_ABORT was acknowledged.</summary>
    Aborted,
}
