using BFMig.Transfer.Store;
using System.Buffers.Binary;
using BFMig.Transfer.Wire;

namespace BFMig.Transfer.Memory;

/// <summary>
/// Sender core of one multifd channel (synchronous, no I/O): cuts the channel with
/// <see cref="MultifdChannelParser"/> and recodes each normal page as the main channel's
/// <see cref="MigEncoder"/> does (elide, reference, delta or full, decided by byte comparison with
/// the retained page), recording what it sends in the store. The op stream:
/// <list type="bullet">
/// <item><c>0x40 RAW be32 n, n bytes</c> (<see cref="MigOps.Raw"/>): channel bytes as they are: the
/// initial packet, packet headers, and everything after the parser stopped following the channel.</item>
/// <item>one byte <see cref="MigOps.KindElide"/>, <see cref="MigOps.KindRef"/> (<c>varint block,
/// varint page, 16-byte hash</c>), <see cref="MigOps.KindDelta"/> (<c>varint n, n bytes</c>) or
/// <see cref="MigOps.KindFull"/> (4096 bytes): the content of the next page.</item>
/// </list>
/// A page op names no address: the page is the one the receiver's own parser, fed the same
/// headers, expects next (block and offset from the packet header QEMU wrote). So both sides
/// place and record a page from the same bytes, and the receiver never trusts a claim about it.
/// Pages of a block outside the trip's layout are sent in full and recorded nowhere; the zero
/// pages a 9.0+ header lists are recorded as zero on both sides.
/// </summary>
public sealed class MultifdEncoder
{
    private readonly MemoryStore? _store;
    private readonly bool _synced;
    private readonly TransferStats _stats;
    private readonly byte[] _ops;
    private readonly byte[] _delta = new byte[QemuFormat.PageSize];
    private readonly byte[] _base = new byte[QemuFormat.PageSize];
    private int _length;
    private int _rawStart = -1;
    private readonly MultifdPlacement _placement;

    /// <param name="store">The sender's store, its trip begun by the main channel (its block list); null or not in a trip: pages are sent in full, unrecorded.</param>
    /// <param name="synced">The hello matched: the receiver holds what this store holds.</param>
    /// <param name="stats">Counters to update.</param>
    public MultifdEncoder(MemoryStore? store, bool synced, TransferStats stats)
    {
        _store = store is { InTrip: true } ? store : null;
        _synced = synced && _store is not null;
        _stats = stats;
        _ops = new byte[FrameCodec.MaxPayload];
        _placement = new MultifdPlacement(_store);
    }

    /// <summary>
    /// The receiver's page index, when the trip is coded against it (<see cref="PeerPageIndex"/>):
    /// a page whose MAC equals the receiver's for that page is elided, since the receiver's
    /// departure snapshot, which a channel's ELIDE restores, is exactly what it indexed.
    /// </summary>
    public PeerPageIndex? PeerIndex { get; init; }

    private UInt128[]?[]? _peerMacs;

    /// <summary>The most input one <see cref="Consume"/> takes, so that the ops never outgrow a frame.</summary>
    public const int MaxInput = 256 << 10;

    /// <summary>The channel's parser (packets, pages, opaque reason).</summary>
    public MultifdChannelParser Parser { get; } = new();

    /// <summary>Ops produced so far and not yet taken.</summary>
    public ReadOnlySpan<byte> Ops => _ops.AsSpan(0, _length);

    /// <summary><see cref="Ops"/> as memory, for asynchronous writes.</summary>
    public ReadOnlyMemory<byte> OpsMemory => _ops.AsMemory(0, _length);

    /// <summary>Length of <see cref="Ops"/>.</summary>
    public int OpsLength => _length;

    /// <summary>Forgets the ops taken by the caller.</summary>
    public void ResetOps()
    {
        _length = 0;
        _rawStart = -1;
    }

    /// <summary>
    /// Consumes segments from <paramref name="input"/> (at most <see cref="MaxInput"/> bytes: an
    /// opaque channel's bytes come back as one raw segment) until no complete one remains or the
    /// ops reach <see cref="MigEncoder.FlushThreshold"/>; returns the bytes consumed. With
    /// <paramref name="isFinal"/> (the channel ended) everything is consumed.
    /// </summary>
    public int Consume(ReadOnlySpan<byte> input, bool isFinal)
    {
        // The store is shared with the trip's other codecs (MemoryStore.Gate).
        if (_store is not { } store) return ConsumeCore(input, isFinal);
        lock (store.Gate)
        {
            // A channel that outlives its trip (abandoned, or committed) must not write into the store.
            if (!store.InTrip) throw new StoreException("the guest's store trip has ended; this multifd channel can no longer be recorded");
            return ConsumeCore(input, isFinal);
        }
    }

    private int ConsumeCore(ReadOnlySpan<byte> input, bool isFinal)
    {
        if (input.Length > MaxInput) throw new ArgumentException($"at most {MaxInput} bytes per call", nameof(input));
        int consumed = 0;
        while (_length < MigEncoder.FlushThreshold && Parser.TryRead(input[consumed..], isFinal, out var seg))
        {
            var bytes = input.Slice(consumed, seg.Length);
            consumed += seg.Length;
            if (seg.Kind == MultifdSegmentKind.Page)
                OnPage(seg, bytes);
            else
            {
                if (seg.Kind == MultifdSegmentKind.Init) ClaimId();
                if (seg.Kind == MultifdSegmentKind.PacketHeader) _placement.PutZeroPages(seg.Packet!, Write);
                AppendRaw(bytes);
            }
        }
        return consumed;
    }

    private void OnPage(MultifdSegment seg, ReadOnlySpan<byte> body)
    {
        _rawStart = -1;
        if (!_placement.TryLocate(seg.Packet!.RamBlock, seg.Offset, out int block, out long page))
        {
            Full(body);
            return;
        }
        var store = _store!;
        // Coded against the store as the trip found it (BaseHash), never against what this trip
        // wrote: the other host may record the main stream's and the other channels' pages of
        // this trip earlier or later than this host does, but both hold the same departure snapshot.
        var old = _synced ? store.BaseHash(block, page) : UInt128.Zero;
        if (old != UInt128.Zero && store.BaseEquals(block, page, body))
        {
            _ops[_length++] = MigOps.KindElide;
            _stats.PagesElided++;
            store.PutDeparture(block, page, Write);
            return;
        }
        var hash = store.Hash(body);
        // Against the receiver's index this store began empty: it records the bytes the receiver keeps.
        if (PeerIndex is { } index && (_peerMacs ??= index.ForLayout(store))[block] is { } macs && macs[page] != UInt128.Zero && index.Mac(body) == macs[page])
        {
            _ops[_length++] = MigOps.KindElide;
            _stats.PagesElided++;
            store.Put(block, page, body, hash, Write);
            return;
        }
        if (_synced && store.TryLocateBase(hash, out int srcBlock, out long srcPage) && store.BaseEquals(srcBlock, srcPage, body))
        {
            _ops[_length++] = MigOps.KindRef;
            _length += Varint.Write(_ops.AsSpan(_length), (ulong)srcBlock);
            _length += Varint.Write(_ops.AsSpan(_length), (ulong)srcPage);
            BinaryPrimitives.WriteUInt128LittleEndian(_ops.AsSpan(_length), hash);
            _length += 16;
            _stats.PagesReferenced++;
        }
        else if (old != UInt128.Zero && DeltaAgainstBase(store, block, page, body) is int n and > 0)
        {
            _ops[_length++] = MigOps.KindDelta;
            _length += Varint.Write(_ops.AsSpan(_length), (ulong)n);
            _delta.AsSpan(0, n).CopyTo(_ops.AsSpan(_length));
            _length += n;
            _stats.PagesDelta++;
        }
        else
        {
            Full(body);
        }
        store.Put(block, page, body, hash, Write);
    }

    private int DeltaAgainstBase(MemoryStore store, int block, long page, ReadOnlySpan<byte> body)
    {
        store.ReadBase(block, page, _base);
        return PageDelta.Encode(_base, body, _delta, MigEncoder.DeltaLimit);
    }

    /// <summary>
    /// Claims a channel id for the trip (false: another channel of the trip has it). The id is the
    /// channel's writer in the store on both hosts, so two channels with one id would be ordered by
    /// arrival, differently on each host: the second is refused.
    /// </summary>
    public Func<byte, bool>? ClaimChannel { get; init; }

    private void ClaimId()
    {
        byte id = Parser.Init!.Value.ChannelId;
        if (ClaimChannel is { } claim && !claim(id)) throw new PeerProtocolException($"multifd channel {id} is already carried in this trip");
    }

    // The write this channel's current packet makes: its sync round orders it against the other writers.
    private PageWrite Write => PageWrite.Channel(Parser.Init!.Value.ChannelId, Parser.Round);

    private void Full(ReadOnlySpan<byte> body)
    {
        _ops[_length++] = MigOps.KindFull;
        body.CopyTo(_ops.AsSpan(_length));
        _length += QemuFormat.PageSize;
        _stats.PagesFull++;
    }

    private void AppendRaw(ReadOnlySpan<byte> bytes)
    {
        if (_rawStart < 0)
        {
            _rawStart = _length;
            _ops[_length] = MigOps.Raw;
            _length += 5;
        }
        bytes.CopyTo(_ops.AsSpan(_length));
        _length += bytes.Length;
        _stats.PassthroughBytes += bytes.Length;
        BinaryPrimitives.WriteUInt32BigEndian(_ops.AsSpan(_rawStart + 1), (uint)(_length - _rawStart - 5));
    }
}
