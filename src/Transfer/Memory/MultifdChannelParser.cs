namespace BFMig.Transfer.Memory;

/// <summary>What a <see cref="MultifdSegment"/> is.</summary>
public enum MultifdSegmentKind : byte
{
    /// <summary>Bytes to carry as they are (the channel is opaque from here on).</summary>
    Raw,
    /// <summary>The channel's initial packet (<see cref="MultifdChannelParser.Init"/>).</summary>
    Init,
    /// <summary>A RAM packet's header (<see cref="MultifdSegment.Packet"/>); its pages follow.</summary>
    PacketHeader,
    /// <summary>One normal page's content, 4096 bytes, of the latest packet.</summary>
    Page,
}

/// <summary>One piece of a multifd channel; concatenating all segments gives back the channel exactly.</summary>
/// <param name="Kind">What the bytes are.</param>
/// <param name="Length">Bytes of input this segment covers.</param>
/// <param name="Packet">For headers and pages: the packet they belong to.</param>
/// <param name="PageNumber">For pages: index into the packet's <see cref="MultifdPacket.NormalOffsets"/>.</param>
public readonly record struct MultifdSegment(MultifdSegmentKind Kind, int Length, MultifdPacket? Packet = null, int PageNumber = -1)
{
    /// <summary>For pages: the page's offset in its RAMBlock.</summary>
    public ulong Offset => Packet!.NormalOffsets[PageNumber];
}

/// <summary>
/// Incremental parser of one multifd channel (<see cref="MultifdFormat"/>): cuts it into the
/// initial packet, packet headers and pages, like <see cref="QemuStreamParser"/> does the main
/// channel. It never fails: the first thing it does not understand in full (compression,
/// 10.0's device-state packets, another page size, a damaged header) switches it to opaque
/// mode, says why in <see cref="OpaqueReason"/>, and the rest comes back as raw bytes, so nothing
/// it has not understood is ever elided. No segment is longer than <see cref="MaxSegmentLength"/>
/// except raw bytes, which are returned as they come.
/// </summary>
public sealed class MultifdChannelParser
{
    /// <summary>The most input one call may need before it can produce a segment: a page (a packet header is 1,344 bytes).</summary>
    public const int MaxSegmentLength = QemuFormat.PageSize > MultifdFormat.PacketHeaderLength ? QemuFormat.PageSize : MultifdFormat.PacketHeaderLength;

    private enum State { Init, Header, Pages, Opaque }

    private State _state = State.Init;
    private MultifdPacket? _packet;
    private int _nextPage;

    /// <summary>The channel's initial packet, once read.</summary>
    public MultifdInit? Init { get; private set; }

    /// <summary>Why the parser went opaque (null while it understands the channel).</summary>
    public string? OpaqueReason { get; private set; }

    /// <summary>True once the rest of the channel is carried as raw bytes.</summary>
    public bool IsOpaque => _state == State.Opaque;

    /// <summary>Stream offset of the next byte this parser will look at.</summary>
    public long Position { get; private set; }

    /// <summary>Packets and pages seen so far.</summary>
    public long Packets { get; private set; }

    /// <summary>Normal pages (with content) seen so far.</summary>
    public long Pages { get; private set; }

    /// <summary>
    /// The sync round of the latest packet: 1 + the SYNC packets before it (a SYNC packet's own
    /// pages belong to the round it ends). The channels and the main stream count the same
    /// iterations this way (<see cref="PageWrite"/>).
    /// </summary>
    public long Round { get; private set; }

    private long _syncs;

    /// <summary>Zero pages listed so far (9.0+ sends them as offsets only).</summary>
    public long ZeroPages { get; private set; }

    /// <summary>The packet whose page comes next (null unless the next segment is a page).</summary>
    public MultifdPacket? PagePacket => _state == State.Pages ? _packet : null;

    /// <summary>With <see cref="PagePacket"/>: the index of the next page in its <see cref="MultifdPacket.NormalOffsets"/>.</summary>
    public int NextPage => _nextPage;

    /// <summary>
    /// Produces the next segment from <paramref name="input"/> (which starts at <see cref="Position"/>).
    /// Returns false and consumes nothing when the input holds no complete segment yet; with
    /// <paramref name="isFinal"/>, a trailing incomplete piece comes back as raw bytes.
    /// </summary>
    public bool TryRead(ReadOnlySpan<byte> input, bool isFinal, out MultifdSegment segment)
    {
        if (_state != State.Opaque && TryParse(input, out segment))
        {
            Position += segment.Length;
            return true;
        }
        if (_state != State.Opaque && isFinal && input.Length > 0)
            GoOpaque($"channel ended inside a packet at offset {Position}");
        if (_state == State.Opaque && input.Length > 0)
        {
            segment = new MultifdSegment(MultifdSegmentKind.Raw, input.Length);
            Position += input.Length;
            return true;
        }
        segment = default;
        return false;
    }

    private bool TryParse(ReadOnlySpan<byte> input, out MultifdSegment segment)
    {
        segment = default;
        switch (_state)
        {
            case State.Init:
                if (input.Length < MultifdFormat.InitLength)
                    return false;
                if (MultifdInit.TryParse(input[..MultifdFormat.InitLength], out var why) is not { } init)
                    return GoOpaque(why!);
                Init = init;
                _state = State.Header;
                segment = new MultifdSegment(MultifdSegmentKind.Init, MultifdFormat.InitLength);
                return true;
            case State.Header:
                if (input.Length < MultifdFormat.PacketHeaderLength)
                    return false;
                if (MultifdPacket.TryParse(input[..MultifdFormat.PacketHeaderLength], out why) is not { } packet)
                    return GoOpaque($"packet {Packets}: {why}");
                Packets++;
                Round = _syncs + 1;
                if (packet.IsSync) _syncs++;
                ZeroPages += packet.ZeroOffsets.Length;
                _packet = packet;
                _nextPage = 0;
                _state = packet.NormalOffsets.Length > 0 ? State.Pages : State.Header;
                segment = new MultifdSegment(MultifdSegmentKind.PacketHeader, MultifdFormat.PacketHeaderLength, packet);
                return true;
            case State.Pages:
                if (input.Length < QemuFormat.PageSize)
                    return false;
                segment = new MultifdSegment(MultifdSegmentKind.Page, QemuFormat.PageSize, _packet, _nextPage);
                Pages++;
                if (++_nextPage == _packet!.NormalOffsets.Length)
                    _state = State.Header;
                return true;
            default:
                return false;
        }
    }

    private bool GoOpaque(string reason)
    {
        OpaqueReason = reason;
        _state = State.Opaque;
        return false;
    }
}
