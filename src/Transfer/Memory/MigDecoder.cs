using System.Buffers.Binary;
using System.Text;
using BFMig.Transfer.Wire;

namespace BFMig.Transfer.Memory;

/// <summary>
/// Receiver core (synchronous, no I/O): rebuilds the exact QEMU stream from <see cref="MigOps"/>
/// and the retained store, verifying every retained page it uses against its hash, and records
/// what it rebuilt. Output is produced in bounded pieces: <see cref="Process"/> stops once
/// <see cref="OutputThreshold"/> bytes are waiting.
/// </summary>
public sealed class MigDecoder
{
    /// <summary>Processing pauses once this much output waits to be written.</summary>
    public const int OutputThreshold = 1 << 20;

    private readonly MemoryStore? _store;
    private readonly bool _keep;
    private readonly ulong _seed;
    private readonly TransferStats _stats;
    private readonly byte[] _out = new byte[OutputThreshold + FrameCodec.MaxPayload + 8192];
    private byte[][] _names = [];
    private long[] _pages = [];
    private int _outLength;
    private long _runLeft;
    private int _lastBlock = -1;
    private long _lastPage = -1;
    private bool _haveBlocks;
    // Elide runs read their retained pages in batches (one pread per 64 pages); any store write invalidates the batch.
    private const int BatchPages = 64;
    private readonly byte[] _batch = new byte[BatchPages * QemuFormat.PageSize];
    private int _batchBlock = -1;
    private long _batchFirst;
    private int _batchCount;
    private long _frame;
    private bool _sealed;
    // Sync round of the main stream's records, advanced by MigOps.Round ops.
    private long _round = 1;
    private readonly long _maxRamBytes;

    /// <summary>The sender's QEMU paused the guest (<see cref="MigEncoder.SourcePaused"/>): the receiver writes to its QEMU ungated.</summary>
    public bool SourcePaused { get; private set; }

    /// <param name="store">The receiver's store (null: only self-contained ops are accepted).</param>
    /// <param name="keep">The hello matched: keep retained content.</param>
    /// <param name="seed">Page-hash seed from the hello.</param>
    /// <param name="stats">Counters to update.</param>
    /// <param name="maxRamBytes">
    /// The most RAM the sender may declare, all blocks together (<see cref="RamLimit"/>); 0: this
    /// host's physical memory plus <see cref="RamLimit.DeviceAllowance"/>.
    /// </param>
    public MigDecoder(MemoryStore? store, bool keep, ulong seed, TransferStats stats, long maxRamBytes = 0)
    {
        _maxRamBytes = maxRamBytes > 0 ? maxRamBytes : RamLimit.ForHost();
        _store = store;
        _keep = keep;
        _seed = seed;
        _stats = stats;
    }

    /// <summary>True once the store trip began (BLOCKS received with a store).</summary>
    public bool TripStarted { get; private set; }

    /// <summary>The sender counts sync rounds (<see cref="MigEncoder.CountRounds"/>, protocol 5); without it every main-stream write counts as round 0.</summary>
    public bool CountRounds { get; init; }

    // The write the main stream's next record makes.
    private PageWrite MainWrite => PageWrite.Main(CountRounds ? _round : 0);

    /// <summary>The sender's pages in doubt (its first frame): with this store's own, unknown for the trip.</summary>
    public MemoryDoubt PeerDoubt { get; set; } = MemoryDoubt.None;

    /// <summary>Rebuilt stream bytes waiting to be written to QEMU.</summary>
    public ReadOnlySpan<byte> Output => _out.AsSpan(0, _outLength);

    /// <summary><see cref="Output"/> as memory, for asynchronous writes.</summary>
    public ReadOnlyMemory<byte> OutputMemory => _out.AsMemory(0, _outLength);

    /// <summary>True while an elide run still has pages to produce (call <see cref="Process"/> again).</summary>
    public bool HasPendingOutput => _runLeft > 0;

    /// <summary>Forgets the output taken by the caller.</summary>
    public void ResetOutput() => _outLength = 0;

    /// <summary>Counts frames, for error messages.</summary>
    public void BeginFrame() => _frame++;

    /// <summary>
    /// After the end frame only opaque bytes may follow: the store is committed while they flow,
    /// so any op that would read or record a page is refused from here on.
    /// </summary>
    public void Seal() => _sealed = true;

    /// <summary>
    /// Processes ops of one frame from <paramref name="offset"/>; returns where it stopped (the
    /// payload length when the frame is done). Throws <see cref="PeerProtocolException"/> on a
    /// malformed op or a retained page that does not match.
    /// </summary>
    public int Process(ReadOnlySpan<byte> p, int offset)
    {
        // The store is shared with the trip's other codecs (MemoryStore.Gate).
        if (_store is not { } store) return ProcessCore(p, offset);
        lock (store.Gate)
            return ProcessCore(p, offset);
    }

    private int ProcessCore(ReadOnlySpan<byte> p, int offset)
    {
        int pos = offset;
        while (true)
        {
            while (_runLeft > 0)
            {
                if (_outLength >= OutputThreshold) return pos;
                _runLeft--;
                EmitPage(MigOps.KindElide, _lastBlock, _lastPage + 1, cont: true, default, pos);
            }
            if (pos >= p.Length || _outLength >= OutputThreshold) return pos;
            int opStart = pos;
            byte op = p[pos++];
            switch (op)
            {
                case MigOps.Raw:
                {
                    if (p.Length - pos < 4) throw Bad("RAW length truncated", opStart);
                    uint n = BinaryPrimitives.ReadUInt32BigEndian(p[pos..]);
                    pos += 4;
                    if (n > (uint)(p.Length - pos)) throw Bad($"RAW of {n} bytes overruns the frame", opStart);
                    p.Slice(pos, (int)n).CopyTo(_out.AsSpan(_outLength));
                    _outLength += (int)n;
                    pos += (int)n;
                    break;
                }
                case MigOps.Blocks:
                    if (_sealed) throw Bad("block list after the end frame", opStart);
                    pos = ReadBlocks(p, pos, opStart);
                    break;
                case MigOps.Round:
                    if (!CountRounds) throw Bad("ROUND from a sender that does not count rounds", opStart);
                    if (_sealed) throw Bad("ROUND after the end frame", opStart);
                    if (_runLeft != 0) throw Bad("ROUND inside an elide run", opStart);
                    _round++;
                    break;
                case MigOps.Paused:
                    if (_sealed) throw Bad("PAUSED after the end frame", opStart);
                    if (_runLeft != 0) throw Bad("PAUSED inside an elide run", opStart);
                    if (SourcePaused) throw Bad("second PAUSED", opStart);
                    SourcePaused = true;
                    break;
                case MigOps.ElideRun:
                {
                    if (_sealed) throw Bad("ELIDE_RUN after the end frame", opStart);
                    ulong n = ReadVarint(p, ref pos, "ELIDE_RUN count", opStart);
                    if (_lastBlock < 0 || n == 0 || n > (ulong)(_pages[_lastBlock] - _lastPage - 1))
                        throw Bad($"ELIDE_RUN of {n} pages after page {_lastPage} of block {_lastBlock}", opStart);
                    _runLeft = (long)n;
                    break;
                }
                default:
                {
                    if (op > 0x1f || (op & MigOps.KindMask) > MigOps.KindUnknown) throw Bad($"unknown op 0x{op:x2}", opStart);
                    if (!_haveBlocks) throw Bad("page op before the block list", opStart);
                    if (_sealed) throw Bad("page op after the end frame", opStart);
                    int block;
                    long page;
                    if ((op & MigOps.SeqBit) != 0)
                    {
                        if (_lastBlock < 0) throw Bad("SEQ page op without a previous page", opStart);
                        block = _lastBlock;
                        page = _lastPage + 1;
                    }
                    else
                    {
                        ulong b = ReadVarint(p, ref pos, "block", opStart);
                        ulong pg = ReadVarint(p, ref pos, "page", opStart);
                        if (b >= (ulong)_names.Length) throw Bad($"block {b} of {_names.Length}", opStart);
                        block = (int)b;
                        page = (long)Math.Min(pg, long.MaxValue);
                    }
                    if (page >= _pages[block]) throw Bad($"page {page} beyond block '{Encoding.UTF8.GetString(_names[block])}' ({_pages[block]} pages)", opStart);
                    pos = EmitPage((byte)(op & MigOps.KindMask), block, page, (op & MigOps.ContBit) != 0, p[pos..], pos, opStart);
                    break;
                }
            }
        }
    }

    private int ReadBlocks(ReadOnlySpan<byte> p, int pos, int opStart)
    {
        if (_haveBlocks) throw Bad("second block list", opStart);
        ulong count = ReadVarint(p, ref pos, "block count", opStart);
        if (count == 0 || count > 4096) throw Bad($"block list of {count} blocks", opStart);
        var names = new byte[count][];
        var pages = new long[count];
        var infos = new List<RamBlockInfo>((int)count);
        // A name is a block's file in the store: two blocks of one name would share (and clobber) it.
        var seen = new HashSet<string>(StringComparer.Ordinal);
        ulong total = 0;
        for (int i = 0; i < (int)count; i++)
        {
            if (pos >= p.Length) throw Bad("block list truncated", opStart);
            int len = p[pos++];
            if (len == 0 || p.Length - pos < len) throw Bad($"block name of {len} bytes", opStart);
            names[i] = p.Slice(pos, len).ToArray();
            pos += len;
            ulong length = ReadVarint(p, ref pos, "block length", opStart);
            if (length == 0 || (length & (QemuFormat.PageSize - 1)) != 0)
                throw Bad($"block length {length}", opStart);
            // The layout sizes the store's files and page indexes (16 bytes per page): a peer must
            // not be able to make them larger than the guest it migrates can need.
            total += Math.Min(length, (ulong)long.MaxValue);
            if (length > (ulong)_maxRamBytes || total > (ulong)_maxRamBytes)
                throw Bad($"block {i} of {length} bytes takes the declared RAM to {total} bytes, over this guest's limit of {_maxRamBytes}", opStart);
            pages[i] = (long)(length >> QemuFormat.PageShift);
            var name = Encoding.UTF8.GetString(names[i]);
            if (!seen.Add(name))
                throw Bad($"block {i} repeats the name of an earlier block", opStart);
            infos.Add(new RamBlockInfo(name, (long)length));
        }
        _names = names;
        _pages = pages;
        _haveBlocks = true;
        if (_store is not null)
        {
            _store.BeginTrip(infos, _seed, _keep, buildLocator: false, PeerDoubt);
            _stats.MemDoubtPages = _store.TripDoubt.Whole ? -1 : _store.TripDoubt.PageCount;
            TripStarted = true;
        }
        return pos;
    }

    private int EmitPage(byte kind, int block, long page, bool cont, ReadOnlySpan<byte> rest, int pos, int opStart = -1)
    {
        if (opStart < 0) opStart = pos;
        _lastBlock = block;
        _lastPage = page;
        if (kind != MigOps.KindElide) _batchBlock = -1;
        if (kind == MigOps.KindUnknown)
        {
            if (TripStarted) _store!.PutUnknown(block, page, MainWrite);
            _stats.UnknownPages++;
            return pos;
        }
        ulong flags = kind == MigOps.KindZero ? QemuFormat.FlagZero : QemuFormat.FlagPage;
        if (cont) flags |= QemuFormat.FlagContinue;
        var o = _out.AsSpan(_outLength);
        BinaryPrimitives.WriteUInt64BigEndian(o, ((ulong)page << QemuFormat.PageShift) | flags);
        int h = 8;
        if (!cont)
        {
            o[8] = (byte)_names[block].Length;
            _names[block].CopyTo(o[9..]);
            h = 9 + _names[block].Length;
        }
        if (kind == MigOps.KindZero)
        {
            o[h] = 0;
            _outLength += h + 1;
            if (TripStarted) _store!.PutZero(block, page, MainWrite);
            _stats.ZeroPages++;
            return pos;
        }
        var content = o.Slice(h, QemuFormat.PageSize);
        int used = 0;
        switch (kind)
        {
            case MigOps.KindElide:
            {
                var store = RequireStore("ELIDE", opStart);
                RequireMainView(store, block, page, "ELIDE", opStart);
                var known = store.GetHash(block, page);
                if (block != _batchBlock || page < _batchFirst || page >= _batchFirst + _batchCount)
                {
                    _batchBlock = block;
                    _batchFirst = page;
                    _batchCount = (int)Math.Min(Math.Max(1, Math.Min(_runLeft + 1, BatchPages)), _pages[block] - page);
                    store.ReadPages(block, page, _batchCount, _batch);
                }
                _batch.AsSpan((int)(page - _batchFirst) << QemuFormat.PageShift, QemuFormat.PageSize).CopyTo(content);
                if (known == UInt128.Zero || store.Hash(content) != known)
                    throw OutOfStep($"elided page {page} of block {block} is not retained here (stores out of step)", opStart);
                store.PutUnchanged(block, page, MainWrite);
                _stats.PagesElided++;
                break;
            }
            case MigOps.KindRef:
            {
                var store = RequireStore("REF", opStart);
                int q = 0;
                ulong sb = ReadVarint(rest, ref q, "REF block", opStart);
                ulong sp = ReadVarint(rest, ref q, "REF page", opStart);
                if (rest.Length - q < 16) throw Bad("REF hash truncated", opStart);
                var hash = BinaryPrimitives.ReadUInt128LittleEndian(rest[q..]);
                q += 16;
                if (sb >= (ulong)_names.Length || sp >= (ulong)_pages[sb]) throw Bad($"REF to block {sb} page {sp} out of range", opStart);
                RequireMainView(store, (int)sb, (long)sp, "REF", opStart);
                store.ReadPage((int)sb, (long)sp, content);
                if (store.Hash(content) != hash) throw OutOfStep($"REF to block {sb} page {sp}: retained content differs (stores out of step)", opStart);
                store.Put(block, page, content, hash, MainWrite);
                _stats.PagesReferenced++;
                used = q;
                break;
            }
            case MigOps.KindDelta:
            {
                var store = RequireStore("DELTA", opStart);
                int q = 0;
                ulong n = ReadVarint(rest, ref q, "DELTA length", opStart);
                if (n > (ulong)(rest.Length - q) || n > QemuFormat.PageSize * 2) throw Bad($"DELTA of {n} bytes overruns the frame", opStart);
                RequireMainView(store, block, page, "DELTA", opStart);
                if (store.GetHash(block, page) == UInt128.Zero) throw Bad($"DELTA against page {page} of block {block}, unknown here", opStart);
                store.ReadPage(block, page, content);
                if (!PageDelta.TryApply(rest.Slice(q, (int)n), content)) throw Bad("malformed DELTA", opStart);
                store.Put(block, page, content, store.Hash(content), MainWrite);
                _stats.PagesDelta++;
                used = q + (int)n;
                break;
            }
            default: // FULL
                if (rest.Length < QemuFormat.PageSize) throw Bad("FULL page truncated", opStart);
                rest[..QemuFormat.PageSize].CopyTo(content);
                if (TripStarted) _store!.Put(block, page, content, _store.Hash(content), MainWrite);
                _stats.PagesFull++;
                used = QemuFormat.PageSize;
                break;
        }
        _outLength += h + QemuFormat.PageSize;
        return pos + used;
    }

    // The sender never codes the main stream against a page a multifd channel wrote in this trip
    // (MemoryStore.MainHash); here that write may have come earlier than there, so such an op
    // cannot be followed: the trip fails, nothing is guessed.
    private void RequireMainView(MemoryStore store, int block, long page, string op, int opStart)
    {
        // Not a damaged or diverged store (the journal covers the trip's writes): only the two hosts' timing.
        if (store.ChannelWrote(block, page))
            throw Bad($"{op} of page {page} of block {block}, which a multifd channel wrote in this trip on this host", opStart);
    }

    private MemoryStore RequireStore(string op, int opStart)
    {
        if (!TripStarted) throw Bad($"{op} needs a retained store, and this receiver has none for the trip", opStart);
        return _store!;
    }

    private ulong ReadVarint(ReadOnlySpan<byte> p, ref int pos, string what, int opStart)
    {
        if (!Varint.TryRead(p, ref pos, out ulong v)) throw Bad($"{what} truncated or too long", opStart);
        return v;
    }

    private PeerProtocolException Bad(string what, int opStart) =>
        new($"mig data frame {_frame}, op at byte {opStart}: {what}");

    private StoreOutOfStepException OutOfStep(string what, int opStart) =>
        new($"mig data frame {_frame}, op at byte {opStart}: {what}") { PagesDiffer = true };
}
