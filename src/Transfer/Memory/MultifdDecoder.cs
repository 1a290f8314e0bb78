using BFMig.Transfer.Store;
using System.Buffers.Binary;
using BFMig.Transfer.Wire;

namespace BFMig.Transfer.Memory;

/// <summary>
/// Receiver core of one multifd channel (synchronous, no I/O): rebuilds the channel exactly as
/// QEMU wrote it from <see cref="MultifdEncoder"/>'s ops and the retained store. It follows the
/// rebuilt bytes with its own parser, so each page op is placed (block, offset) by the packet
/// header QEMU wrote, never by the sender's word; a page op where the channel has no page next,
/// or page content inside a raw op, is a protocol error. Every retained page it uses is checked
/// against its hash (a mismatch: <see cref="StoreOutOfStepException"/>), and what it rebuilds is
/// recorded. Output is produced in bounded pieces, as <see cref="MigDecoder"/>'s.
/// </summary>
public sealed class MultifdDecoder
{
    private readonly MemoryStore? _store;
    private readonly TransferStats _stats;
    private readonly byte[] _out = new byte[MigDecoder.OutputThreshold + FrameCodec.MaxPayload + QemuFormat.PageSize];
    private readonly MultifdFollower _follower = new();
    private readonly MultifdPlacement _placement;
    private int _outLength;
    private long _frame;

    /// <param name="store">The receiver's store, its trip begun by the main channel; null or not in a trip: only raw and full pages are accepted, nothing is recorded.</param>
    /// <param name="stats">Counters to update.</param>
    public MultifdDecoder(MemoryStore? store, TransferStats stats)
    {
        _store = store is { InTrip: true } ? store : null;
        _stats = stats;
        _placement = new MultifdPlacement(_store);
    }

    /// <summary>The parser following the rebuilt channel.</summary>
    public MultifdChannelParser Parser => _follower.Parser;

    /// <summary>Rebuilt channel bytes waiting to be written to QEMU.</summary>
    public ReadOnlySpan<byte> Output => _out.AsSpan(0, _outLength);

    /// <summary><see cref="Output"/> as memory, for asynchronous writes.</summary>
    public ReadOnlyMemory<byte> OutputMemory => _out.AsMemory(0, _outLength);

    /// <summary>Forgets the output taken by the caller.</summary>
    public void ResetOutput() => _outLength = 0;

    /// <summary>Counts frames, for error messages.</summary>
    public void BeginFrame() => _frame++;

    /// <summary>
    /// Processes ops of one frame from <paramref name="offset"/>; returns where it stopped (the
    /// payload length when the frame is done; earlier once <see cref="MigDecoder.OutputThreshold"/>
    /// bytes wait). Throws <see cref="PeerProtocolException"/> on a malformed or misplaced op.
    /// </summary>
    public int Process(ReadOnlySpan<byte> p, int offset)
    {
        // The store is shared with the trip's other codecs (MemoryStore.Gate).
        if (_store is not { } store) return ProcessCore(p, offset);
        lock (store.Gate)
        {
            // A channel that outlives its trip (abandoned, or committed) must not write into the store.
            if (!store.InTrip) throw new StoreException("the guest's store trip has ended; this multifd channel can no longer be recorded");
            return ProcessCore(p, offset);
        }
    }

    private int ProcessCore(ReadOnlySpan<byte> p, int offset)
    {
        int pos = offset;
        while (pos < p.Length && _outLength < MigDecoder.OutputThreshold)
        {
            int opStart = pos;
            byte op = p[pos++];
            if (op == MigOps.Raw)
            {
                if (p.Length - pos < 4) throw Bad("RAW length truncated", opStart);
                uint n = BinaryPrimitives.ReadUInt32BigEndian(p[pos..]);
                pos += 4;
                if (n == 0 || n > (uint)(p.Length - pos)) throw Bad($"RAW of {n} bytes in a frame with {p.Length - pos} left", opStart);
                var bytes = p.Slice(pos, (int)n);
                _follower.Feed(bytes, s => OnRawSegment(s, opStart));
                bytes.CopyTo(_out.AsSpan(_outLength));
                _outLength += (int)n;
                pos += (int)n;
                continue;
            }
            if (op > MigOps.KindFull) throw Bad($"unknown op 0x{op:x2}", opStart);
            if (!_follower.AtSegmentBoundary || Parser.PagePacket is not { } packet)
                throw Bad("page op where the channel has no page next", opStart);
            ulong offsetInBlock = packet.NormalOffsets[Parser.NextPage];
            bool located = _placement.TryLocate(packet.RamBlock, offsetInBlock, out int block, out long page);
            var content = _out.AsSpan(_outLength, QemuFormat.PageSize);
            pos = RebuildPage(op, located, block, page, content, p, pos, opStart);
            if (!Parser.TryRead(content, isFinal: false, out var seg) || seg.Kind != MultifdSegmentKind.Page)
                throw new InvalidOperationException("the channel parser expected a page and did not take one");
            _outLength += QemuFormat.PageSize;
        }
        return pos;
    }

    /// <summary>The channel ended: a packet cut short is carried as it came (the parser says so).</summary>
    public void Finish() => _follower.Finish();

    private void OnRawSegment(MultifdSegment s, int opStart)
    {
        if (s.Kind == MultifdSegmentKind.Page) throw Bad("page content inside a RAW op", opStart);
        if (s.Kind == MultifdSegmentKind.Init && ClaimChannel is { } claim && !claim(Parser.Init!.Value.ChannelId))
            throw Bad($"multifd channel {Parser.Init!.Value.ChannelId} is already carried in this trip", opStart);
        if (s.Kind == MultifdSegmentKind.PacketHeader) _placement.PutZeroPages(s.Packet!, Write);
    }

    /// <summary>Claims a channel id for the trip (<see cref="MultifdEncoder.ClaimChannel"/>): false refuses the channel.</summary>
    public Func<byte, bool>? ClaimChannel { get; init; }

    // The write this channel's current packet makes: its sync round orders it against the other writers.
    private PageWrite Write => PageWrite.Channel(Parser.Init!.Value.ChannelId, Parser.Round);

    // Every retained page used is the departure snapshot's (MultifdEncoder codes against it), checked against its hash.
    private int RebuildPage(byte kind, bool located, int block, long page, Span<byte> content, ReadOnlySpan<byte> p, int pos, int opStart)
    {
        if (kind == MigOps.KindFull)
        {
            if (p.Length - pos < QemuFormat.PageSize) throw Bad("FULL page truncated", opStart);
            p.Slice(pos, QemuFormat.PageSize).CopyTo(content);
            if (located) _store!.Put(block, page, content, _store.Hash(content), Write);
            _stats.PagesFull++;
            return pos + QemuFormat.PageSize;
        }
        if (!located) throw Bad($"op {kind} for a page this store does not hold (no trip, or outside its layout)", opStart);
        var store = _store!;
        switch (kind)
        {
            case MigOps.KindElide:
            {
                var known = store.BaseHash(block, page);
                if (known == UInt128.Zero) throw OutOfStep($"elided page {page} of block {block} is not retained here (stores out of step)", opStart);
                store.ReadBase(block, page, content);
                if (store.Hash(content) != known)
                    throw OutOfStep($"elided page {page} of block {block} is not what the index says (damaged store)", opStart, damaged: true);
                store.PutDeparture(block, page, Write);
                _stats.PagesElided++;
                return pos;
            }
            case MigOps.KindRef:
            {
                ulong sb = ReadVarint(p, ref pos, "REF block", opStart);
                ulong sp = ReadVarint(p, ref pos, "REF page", opStart);
                if (p.Length - pos < 16) throw Bad("REF hash truncated", opStart);
                var hash = BinaryPrimitives.ReadUInt128LittleEndian(p[pos..]);
                pos += 16;
                if (sb >= (ulong)store.BlockCount || sp >= (ulong)store.PageCount((int)sb)) throw Bad($"REF to block {sb} page {sp} out of range", opStart);
                if (store.BaseHash((int)sb, (long)sp) != hash) throw OutOfStep($"REF to block {sb} page {sp}: not retained here with that hash (stores out of step)", opStart);
                store.ReadBase((int)sb, (long)sp, content);
                if (store.Hash(content) != hash) throw OutOfStep($"REF to block {sb} page {sp}: retained content differs from its index (damaged store)", opStart, damaged: true);
                store.Put(block, page, content, hash, Write);
                _stats.PagesReferenced++;
                return pos;
            }
            default: // DELTA
            {
                ulong n = ReadVarint(p, ref pos, "DELTA length", opStart);
                if (n > (ulong)(p.Length - pos) || n > QemuFormat.PageSize * 2) throw Bad($"DELTA of {n} bytes overruns the frame", opStart);
                var known = store.BaseHash(block, page);
                if (known == UInt128.Zero) throw Bad($"DELTA against page {page} of block {block}, unknown here", opStart);
                store.ReadBase(block, page, content);
                if (store.Hash(content) != known) throw OutOfStep($"DELTA base page {page} of block {block} is not what the index says (damaged store)", opStart, damaged: true);
                if (!PageDelta.TryApply(p.Slice(pos, (int)n), content)) throw Bad("malformed DELTA", opStart);
                store.Put(block, page, content, store.Hash(content), Write);
                _stats.PagesDelta++;
                return pos + (int)n;
            }
        }
    }

    private ulong ReadVarint(ReadOnlySpan<byte> p, ref int pos, string what, int opStart)
    {
        if (!Varint.TryRead(p, ref pos, out ulong v)) throw Bad($"{what} truncated or too long", opStart);
        return v;
    }

    private PeerProtocolException Bad(string what, int opStart) =>
        new($"multifd data frame {_frame}, op at byte {opStart}: {what}");

    private StoreOutOfStepException OutOfStep(string what, int opStart, bool damaged = false) =>
        new($"multifd data frame {_frame}, op at byte {opStart}: {what}") { PagesDiffer = damaged };
}
