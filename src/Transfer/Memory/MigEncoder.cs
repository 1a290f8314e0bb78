using System.Buffers.Binary;
using System.IO.Hashing;
using BFMig.Transfer.Wire;

namespace BFMig.Transfer.Memory;

/// <summary>
/// Sender core (synchronous, no I/O): turns QEMU stream bytes into <see cref="MigOps"/>, deciding
/// for every page whether to elide it, reference another retained page, send a delta or send it
/// in full, and recording what it sends in the store. Elision and references are decided by byte
/// comparison with the retained page (the page hash only finds the candidate). No allocation per page.
/// </summary>
public sealed class MigEncoder
{
    /// <summary>Ops are cut into a frame once they reach this size.</summary>
    public const int FlushThreshold = 256 << 10;
    /// <summary>A delta is used only when it is at most this long (compressed further by the frame codec).</summary>
    public const int DeltaLimit = QemuFormat.PageSize / 2;

    private readonly MemoryStore? _store;
    private readonly bool _synced;
    private readonly ulong _seed;
    private readonly TransferStats _stats;
    private byte[] _ops;
    private readonly byte[] _delta = new byte[QemuFormat.PageSize];
    private int _length;
    private int _rawStart = -1;
    private long _run;
    private int _lastBlock = -1;
    private long _lastPage = -1;

    /// <param name="store">The sender's store, or null to send every page in full without recording.</param>
    /// <param name="synced">The hello matched: the receiver holds what this store holds.</param>
    /// <param name="seed">Page-hash seed agreed in the hello.</param>
    /// <param name="stats">Counters to update.</param>
    /// <param name="ops">Buffer for the ops (at least <see cref="FrameCodec.MaxPayload"/> bytes); a new one if null.</param>
    public MigEncoder(MemoryStore? store, bool synced, ulong seed, TransferStats stats, byte[]? ops = null)
    {
        _ops = ops ?? new byte[FrameCodec.MaxPayload];
        if (_ops.Length < FrameCodec.MaxPayload) throw new ArgumentException($"op buffer of {_ops.Length} bytes, need {FrameCodec.MaxPayload}", nameof(ops));
        _store = store;
        _synced = synced && store is not null;
        _seed = seed;
        _stats = stats;
    }

    /// <summary>The QEMU stream parser (blocks, opaque reason, completeness).</summary>
    public QemuStreamParser Parser { get; } = new();

    /// <summary>True once the store trip began (the block list was seen).</summary>
    public bool TripStarted { get; private set; }

    /// <summary>
    /// Emit a <see cref="MigOps.Round"/> op at every ram EOS, so that both hosts record the main
    /// stream's pages with their sync round (<see cref="PageWrite"/>; a peer that speaks protocol 5).
    /// Without it every main-stream write counts as round 0.
    /// </summary>
    public bool CountRounds { get; init; }

    /// <summary>
    /// The source QEMU paused the guest (<see cref="QemuStreamParser.InRamEnd"/>), and a
    /// <see cref="MigOps.Paused"/> op says so to the receiver. From here on QEMU has decided its
    /// switchover, so holding the stream back can no longer inform its bandwidth estimate: it
    /// only keeps the guest paused longer. The sender stops pacing and the receiver stops gating.
    /// </summary>
    public bool SourcePaused { get; private set; }

    private long _round = 1;
    private readonly XxHash128 _streamHash = new();
    private bool _opaqueSeen;

    /// <summary>XXH3-128 of the stream consumed before the parser stopped following it: what End carries, and the receiver checks against what it rebuilt.</summary>
    public byte[] StreamDigest() => _streamHash.GetCurrentHash();

    // The write the main stream's next record makes.
    private PageWrite MainWrite => PageWrite.Main(CountRounds ? _round : 0);

    /// <summary>
    /// The receiver's page index, when the hello did not match but the receiver still holds an
    /// earlier snapshot (<see cref="PeerPageIndex"/>): this store starts the trip empty, and a page
    /// the trip has not recorded yet is elided when its MAC equals the receiver's for that page.
    /// </summary>
    public PeerPageIndex? PeerIndex { get; init; }

    // PeerIndex's MACs for the stream's blocks, by position (null: not held there).
    private UInt128[]?[]? _peerMacs;

    /// <summary>The receiver's pages in doubt (its hello reply): with this store's own, unknown for the trip.</summary>
    public MemoryDoubt PeerDoubt { get; set; } = MemoryDoubt.None;

    /// <summary>Ops produced so far and not yet taken.</summary>
    public ReadOnlySpan<byte> Ops => _ops.AsSpan(0, _length);

    /// <summary><see cref="Ops"/> as memory, for asynchronous writes.</summary>
    public ReadOnlyMemory<byte> OpsMemory => _ops.AsMemory(0, _length);

    /// <summary>Length of <see cref="Ops"/>.</summary>
    public int OpsLength => _length;

    /// <summary>Ends any pending elide run so that <see cref="Ops"/> is complete, ready to be framed.</summary>
    public void CompleteOps()
    {
        FlushRun();
        _rawStart = -1;
    }

    /// <summary>
    /// Hands the caller the buffer holding <see cref="Ops"/> (complete them first) and continues
    /// with <paramref name="next"/>, so the full one can be compressed and sent while encoding goes on.
    /// </summary>
    public byte[] SwapOps(byte[] next)
    {
        if (next.Length < FrameCodec.MaxPayload) throw new ArgumentException($"op buffer of {next.Length} bytes, need {FrameCodec.MaxPayload}", nameof(next));
        if (_run != 0) throw new InvalidOperationException("ops are not complete (an elide run is open)");
        var full = _ops;
        _ops = next;
        _length = 0;
        _rawStart = -1;
        return full;
    }

    /// <summary>Forgets the ops taken by the caller.</summary>
    public void ResetOps()
    {
        _length = 0;
        _rawStart = -1;
    }

    /// <summary>
    /// Consumes segments from <paramref name="input"/> until no complete segment remains, the
    /// ops reach <see cref="FlushThreshold"/>, or the parser has just turned opaque (the caller
    /// sends End before any opaque byte: see <see cref="MigSender"/>); returns the bytes consumed.
    /// </summary>
    public int Consume(ReadOnlySpan<byte> input, bool isFinal)
    {
        // The store is shared with the trip's other codecs (MemoryStore.Gate).
        if (_store is not { } store) return ConsumeCore(input, isFinal);
        lock (store.Gate)
            return ConsumeCore(input, isFinal);
    }

    private int ConsumeCore(ReadOnlySpan<byte> input, bool isFinal)
    {
        int consumed = 0;
        while (_length < FlushThreshold && Parser.TryRead(input[consumed..], isFinal, out var seg))
        {
            var bytes = input.Slice(consumed, seg.Length);
            consumed += seg.Length;
            if (seg.Kind == SegmentKind.OpaqueFromHere) _opaqueSeen = true;
            else if (!_opaqueSeen) _streamHash.Append(bytes);
            switch (seg.Kind)
            {
                case SegmentKind.Page:
                    OnPage(seg, bytes[seg.HeaderLength..]);
                    break;
                case SegmentKind.BlocksDefined:
                    OnBlocks();
                    break;
                case SegmentKind.OpaqueFromHere:
                    _stats.OpaqueReason = Parser.OpaqueReason;
                    return consumed;
                default:
                    OnRaw(seg, bytes);
                    break;
            }
            if (!SourcePaused && Parser.InRamEnd)
            {
                FlushRun();
                _rawStart = -1;
                _ops[_length++] = MigOps.Paused;
                SourcePaused = true;
            }
            if (CountRounds && Parser.RamRound != _round)
            {
                FlushRun();
                _rawStart = -1;
                _ops[_length++] = MigOps.Round;
                _round = Parser.RamRound;
            }
        }
        _stats.OpaqueReason = Parser.OpaqueReason;
        return consumed;
    }

    private void OnBlocks()
    {
        FlushRun();
        _rawStart = -1;
        var blocks = Parser.Blocks;
        _ops[_length++] = MigOps.Blocks;
        _length += Varint.Write(_ops.AsSpan(_length), (ulong)blocks.Count);
        foreach (var b in blocks)
        {
            _ops[_length++] = (byte)b.NameBytes.Length;
            b.NameBytes.CopyTo(_ops, _length);
            _length += b.NameBytes.Length;
            _length += Varint.Write(_ops.AsSpan(_length), (ulong)b.UsedLength);
        }
        if (_store is not null)
        {
            _store.BeginTrip(blocks, _seed, keep: _synced && PeerIndex is null, buildLocator: _synced, PeerDoubt);
            _peerMacs = PeerIndex?.ForLayout(blocks);
            _stats.MemDoubtPages = PeerIndex is not null ? 0 : _store.TripDoubt.Whole ? -1 : _store.TripDoubt.PageCount;
            TripStarted = true;
        }
    }

    private void OnRaw(QemuSegment seg, ReadOnlySpan<byte> bytes)
    {
        if (seg.Fact == PageFact.Zero)
        {
            PageOp(MigOps.KindZero, seg.BlockIndex, seg.PageIndex, seg.Continue);
            _stats.ZeroPages++;
            if (TripStarted) _store!.PutZero(seg.BlockIndex, seg.PageIndex, MainWrite);
            return;
        }
        AppendRaw(bytes);
        _stats.PassthroughBytes += bytes.Length;
        if (seg.Fact == PageFact.Unknown)
        {
            PageOp(MigOps.KindUnknown, seg.BlockIndex, seg.PageIndex, cont: false);
            _stats.UnknownPages++;
            if (TripStarted) _store!.PutUnknown(seg.BlockIndex, seg.PageIndex, MainWrite);
        }
    }

    private void OnPage(QemuSegment seg, ReadOnlySpan<byte> body)
    {
        int block = seg.BlockIndex;
        long page = seg.PageIndex;
        if (!TripStarted)
        {
            PageOp(MigOps.KindFull, block, page, seg.Continue);
            Append(body);
            _stats.PagesFull++;
            return;
        }
        var store = _store!;
        // A page is elided or referenced only when its bytes equal the retained page's (the
        // receiver holds the same bytes); the page hash only finds REF candidates. So a guest that
        // crafts a page colliding with another under the hash gets it carried, not swapped for the
        // other. Unchanged pages (the common case) are compared first and need no hash at all.
        // A page a multifd channel wrote in this trip is not used (MainHash 0): the receiver may
        // not have recorded that write yet, or may have already.
        var old = _synced ? store.MainHash(block, page) : UInt128.Zero;
        if (old != UInt128.Zero && store.PageEquals(block, page, body))
        {
            PageOp(MigOps.KindElide, block, page, seg.Continue);
            store.PutUnchanged(block, page, MainWrite);
            _stats.PagesElided++;
            return;
        }
        var hash = store.Hash(body);
        // Against the receiver's index: only a page neither stream has recorded yet is still what the
        // receiver kept (afterwards this store holds what the receiver holds, and the checks above apply).
        if (old == UInt128.Zero && _peerMacs?[block] is { } macs && macs[page] != UInt128.Zero && store.Untouched(block, page)
            && PeerIndex!.Mac(body) == macs[page])
        {
            PageOp(MigOps.KindElide, block, page, seg.Continue);
            store.Put(block, page, body, hash, MainWrite);
            _stats.PagesElided++;
            return;
        }
        if (_synced)
        {
            if (store.TryLocate(hash, out int srcBlock, out long srcPage) && store.PageEquals(srcBlock, srcPage, body))
            {
                PageOp(MigOps.KindRef, block, page, seg.Continue);
                _length += Varint.Write(_ops.AsSpan(_length), (ulong)srcBlock);
                _length += Varint.Write(_ops.AsSpan(_length), (ulong)srcPage);
                BinaryPrimitives.WriteUInt128LittleEndian(_ops.AsSpan(_length), hash);
                _length += 16;
                _stats.PagesReferenced++;
                store.Put(block, page, body, hash, MainWrite);
                return;
            }
            if (old != UInt128.Zero)
            {
                int n = PageDelta.Encode(store.Page(block, page), body, _delta, DeltaLimit);
                if (n > 0)
                {
                    PageOp(MigOps.KindDelta, block, page, seg.Continue);
                    _length += Varint.Write(_ops.AsSpan(_length), (ulong)n);
                    Append(_delta.AsSpan(0, n));
                    _stats.PagesDelta++;
                    store.Put(block, page, body, hash, MainWrite);
                    return;
                }
            }
        }
        PageOp(MigOps.KindFull, block, page, seg.Continue);
        Append(body);
        _stats.PagesFull++;
        store.Put(block, page, body, hash, MainWrite);
    }

    private void PageOp(byte kind, int block, long page, bool cont)
    {
        bool seq = block == _lastBlock && page == _lastPage + 1;
        _lastBlock = block;
        _lastPage = page;
        _rawStart = -1;
        if (kind == MigOps.KindElide && seq && cont)
        {
            _run++;
            return;
        }
        FlushRun();
        _rawStart = -1;
        _ops[_length++] = (byte)(kind | (seq ? MigOps.SeqBit : 0) | (cont ? MigOps.ContBit : 0));
        if (!seq)
        {
            _length += Varint.Write(_ops.AsSpan(_length), (ulong)block);
            _length += Varint.Write(_ops.AsSpan(_length), (ulong)page);
        }
    }

    private void FlushRun()
    {
        if (_run == 0) return;
        _rawStart = -1;
        _ops[_length++] = MigOps.ElideRun;
        _length += Varint.Write(_ops.AsSpan(_length), (ulong)_run);
        _run = 0;
    }

    private void AppendRaw(ReadOnlySpan<byte> bytes)
    {
        FlushRun();
        if (_rawStart < 0)
        {
            _rawStart = _length;
            _ops[_length] = MigOps.Raw;
            _length += 5;
        }
        Append(bytes);
        BinaryPrimitives.WriteUInt32BigEndian(_ops.AsSpan(_rawStart + 1), (uint)(_length - _rawStart - 5));
    }

    private void Append(ReadOnlySpan<byte> bytes)
    {
        bytes.CopyTo(_ops.AsSpan(_length));
        _length += bytes.Length;
    }
}
