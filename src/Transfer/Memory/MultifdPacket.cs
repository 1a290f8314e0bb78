using System.Buffers.Binary;
using System.Text;

namespace BFMig.Transfer.Memory;

/// <summary>
/// The wire format of a QEMU multifd channel (migration/multifd.[ch]), as QEMU 7.2 and 10.0 write
/// it without compression. A channel starts with one initial packet, then carries RAM packets:
/// a fixed-size header with the page offsets, then the normal pages' content.
/// <list type="bullet">
/// <item>Initial packet, 64 bytes: be32 magic 0x11223344, be32 version 1, 16 bytes source UUID,
/// u8 channel id, 7 + 32 reserved bytes.</item>
/// <item>RAM packet: be32 magic, be32 version 1, be32 flags, be32 pages_alloc, be32 normal_pages,
/// be32 next_packet_size, be64 packet_num, then 32 bytes that are reserved in 7.2 and begin with
/// be32 zero_pages from 9.0 on, char ramblock[256], be64 offset[pages_alloc]: the normal pages'
/// offsets in the block, then (9.0+) the zero pages'. Then normal_pages pages of content.</item>
/// </list>
/// The header's length is fixed by both sides' page count (512 KiB / 4 KiB = 128 offsets), not by
/// what pages_alloc says, so a packet whose pages_alloc differs, whose flags name compression or
/// device state (10.0), or whose next_packet_size is not its pages' bytes (when it has pages: a
/// packet without pages keeps the previous one's value in 7.2) is not understood.
/// </summary>
public static class MultifdFormat
{
    public const uint Magic = QemuFormat.MultifdMagic;
    public const uint Version = 1;
    public const int InitLength = 64;
    public const int ChannelIdOffset = 24;

    /// <summary>MULTIFD_FLAG_SYNC: the packet ends a sync round (it may carry pages too).</summary>
    public const uint FlagSync = 1;

    /// <summary>MULTIFD_PACKET_SIZE: the content one packet can carry.</summary>
    public const int PacketContentBytes = 512 * 1024;

    /// <summary>Offsets per packet: both QEMUs size the header by it.</summary>
    public const int PagesPerPacket = PacketContentBytes / QemuFormat.PageSize;

    public const int RamBlockNameLength = 256;

    /// <summary>Header bytes before the offsets array (magic to ramblock).</summary>
    public const int FixedHeaderLength = 64 + RamBlockNameLength;

    /// <summary>A RAM packet's header: fixed part and the offsets.</summary>
    public const int PacketHeaderLength = FixedHeaderLength + 8 * PagesPerPacket;
}

/// <summary>A multifd channel's initial packet: which channel it is.</summary>
/// <param name="ChannelId">QEMU's channel number (0 .. connections - 1).</param>
/// <param name="SourceUuid">The source QEMU's UUID as it sent it.</param>
public readonly record struct MultifdInit(byte ChannelId, Guid SourceUuid)
{
    /// <summary>
    /// Reads an initial packet from <paramref name="input"/> (at least <see cref="MultifdFormat.InitLength"/>
    /// bytes); null with <paramref name="why"/> when it is not one this code understands.
    /// </summary>
    public static MultifdInit? TryParse(ReadOnlySpan<byte> input, out string? why)
    {
        why = null;
        if (input.Length < MultifdFormat.InitLength)
        {
            why = $"initial packet of {input.Length} bytes, expected {MultifdFormat.InitLength}";
            return null;
        }
        uint magic = BinaryPrimitives.ReadUInt32BigEndian(input);
        uint version = BinaryPrimitives.ReadUInt32BigEndian(input[4..]);
        if (magic != MultifdFormat.Magic)
            why = $"initial packet magic 0x{magic:x8}, expected 0x{MultifdFormat.Magic:x8}";
        else if (version != MultifdFormat.Version)
            why = $"multifd version {version}, this parser knows {MultifdFormat.Version}";
        if (why is not null)
            return null;
        return new MultifdInit(input[MultifdFormat.ChannelIdOffset], new Guid(input.Slice(8, 16), bigEndian: true));
    }

    /// <summary>The 64 bytes QEMU sends (for tests and the receiver's rebuilt stream).</summary>
    public byte[] Encode()
    {
        var b = new byte[MultifdFormat.InitLength];
        BinaryPrimitives.WriteUInt32BigEndian(b, MultifdFormat.Magic);
        BinaryPrimitives.WriteUInt32BigEndian(b.AsSpan(4), MultifdFormat.Version);
        SourceUuid.TryWriteBytes(b.AsSpan(8), bigEndian: true, out _);
        b[MultifdFormat.ChannelIdOffset] = ChannelId;
        return b;
    }
}

/// <summary>
/// A multifd RAM packet's header, understood in full: the block, the offsets of the pages whose
/// content follows (<see cref="NormalOffsets"/>, <see cref="MultifdFormat.PacketHeaderLength"/>
/// bytes after its start, 4096 bytes each) and of the pages that are zero (9.0+; no content).
/// </summary>
public sealed record MultifdPacket(uint Flags, ulong PacketNumber, string RamBlock, ulong[] NormalOffsets, ulong[] ZeroOffsets)
{
    /// <summary>Bytes of page content after the header.</summary>
    public int ContentLength => NormalOffsets.Length * QemuFormat.PageSize;

    /// <summary>True for a packet that ends a sync round.</summary>
    public bool IsSync => (Flags & MultifdFormat.FlagSync) != 0;

    /// <summary>
    /// Reads a packet header from <paramref name="header"/> (exactly
    /// <see cref="MultifdFormat.PacketHeaderLength"/> bytes). Null, with <paramref name="why"/>,
    /// for anything not understood in full: the caller then carries the channel byte for byte.
    /// </summary>
    public static MultifdPacket? TryParse(ReadOnlySpan<byte> header, out string? why)
    {
        why = Check(header);
        if (why is not null)
            return null;
        uint normal = BinaryPrimitives.ReadUInt32BigEndian(header[16..]);
        uint zero = BinaryPrimitives.ReadUInt32BigEndian(header[32..]);
        var name = header.Slice(64, MultifdFormat.RamBlockNameLength);
        int end = name.IndexOf((byte)0);
        var offsets = header[MultifdFormat.FixedHeaderLength..];
        var normalOffsets = new ulong[normal];
        var zeroOffsets = new ulong[zero];
        for (int i = 0; i < normal + zero; i++)
        {
            ulong offset = BinaryPrimitives.ReadUInt64BigEndian(offsets[(8 * i)..]);
            if (i < normal)
                normalOffsets[i] = offset;
            else
                zeroOffsets[i - normal] = offset;
        }
        return new MultifdPacket(BinaryPrimitives.ReadUInt32BigEndian(header[8..]), BinaryPrimitives.ReadUInt64BigEndian(header[24..]),
            Encoding.ASCII.GetString(name[..end]), normalOffsets, zeroOffsets);
    }

    // Every rule a header must pass before anything is allocated for it.
    private static string? Check(ReadOnlySpan<byte> h)
    {
        if (h.Length != MultifdFormat.PacketHeaderLength)
            return $"packet header of {h.Length} bytes, expected {MultifdFormat.PacketHeaderLength}";
        uint magic = BinaryPrimitives.ReadUInt32BigEndian(h);
        if (magic != MultifdFormat.Magic)
            return $"packet magic 0x{magic:x8}, expected 0x{MultifdFormat.Magic:x8}";
        uint version = BinaryPrimitives.ReadUInt32BigEndian(h[4..]);
        if (version != MultifdFormat.Version)
            return $"multifd version {version}, this parser knows {MultifdFormat.Version}";
        uint flags = BinaryPrimitives.ReadUInt32BigEndian(h[8..]);
        if ((flags & ~MultifdFormat.FlagSync) != 0)
            return $"packet flags 0x{flags:x} (compression or device state): not understood";
        uint alloc = BinaryPrimitives.ReadUInt32BigEndian(h[12..]);
        uint normal = BinaryPrimitives.ReadUInt32BigEndian(h[16..]);
        uint zero = BinaryPrimitives.ReadUInt32BigEndian(h[32..]);
        // QEMU 9.1+ fills only the common header of a packet without RAM (its SYNC packets): no slots, no pages.
        bool withoutRam = alloc == 0 && normal == 0 && zero == 0;
        if (alloc != MultifdFormat.PagesPerPacket && !withoutRam)
            return $"packet of {alloc} page slots, expected {MultifdFormat.PagesPerPacket} (another page size?)";
        if ((ulong)normal + zero > alloc)
            return $"packet lists {normal} normal and {zero} zero pages in {alloc} slots";
        // Without pages QEMU neither prepares nor reads content, and 7.2 leaves the previous
        // packet's size in the field (seen in the lab on sync packets): it counts only with pages.
        uint next = BinaryPrimitives.ReadUInt32BigEndian(h[20..]);
        if (normal > 0 && next != normal * (ulong)QemuFormat.PageSize)
            return $"packet announces {next} content bytes for {normal} pages";
        if (h.Slice(36, 28).ContainsAnyExcept((byte)0))
            return "reserved header bytes are set (a newer packet layout?)";
        var name = h.Slice(64, MultifdFormat.RamBlockNameLength);
        int end = name.IndexOf((byte)0);
        if (end < 0)
            return "ramblock name is not NUL-terminated";
        if (normal + zero > 0 && end == 0)
            return "packet with pages names no ramblock";
        if (name[..end].ContainsAnyExceptInRange((byte)0x21, (byte)0x7e))
            return "ramblock name is not printable ASCII";
        var offsets = h[MultifdFormat.FixedHeaderLength..];
        for (int i = 0; i < normal + zero; i++)
        {
            ulong offset = BinaryPrimitives.ReadUInt64BigEndian(offsets[(8 * i)..]);
            if ((offset & QemuFormat.FlagMask) != 0)
                return $"page offset 0x{offset:x} is not page-aligned";
        }
        return null;
    }

    /// <summary>The header bytes QEMU would send for this packet (tests; the receiver's rebuilt channel).</summary>
    public byte[] EncodeHeader()
    {
        if (NormalOffsets.Length + ZeroOffsets.Length > MultifdFormat.PagesPerPacket)
            throw new ArgumentException($"more than {MultifdFormat.PagesPerPacket} pages in one packet");
        var name = Encoding.ASCII.GetBytes(RamBlock);
        if (name.Length >= MultifdFormat.RamBlockNameLength)
            throw new ArgumentException("ramblock name longer than 255 bytes");
        var b = new byte[MultifdFormat.PacketHeaderLength];
        var s = b.AsSpan();
        BinaryPrimitives.WriteUInt32BigEndian(s, MultifdFormat.Magic);
        BinaryPrimitives.WriteUInt32BigEndian(s[4..], MultifdFormat.Version);
        BinaryPrimitives.WriteUInt32BigEndian(s[8..], Flags);
        BinaryPrimitives.WriteUInt32BigEndian(s[12..], MultifdFormat.PagesPerPacket);
        BinaryPrimitives.WriteUInt32BigEndian(s[16..], (uint)NormalOffsets.Length);
        BinaryPrimitives.WriteUInt32BigEndian(s[20..], (uint)ContentLength);
        BinaryPrimitives.WriteUInt64BigEndian(s[24..], PacketNumber);
        BinaryPrimitives.WriteUInt32BigEndian(s[32..], (uint)ZeroOffsets.Length);
        name.CopyTo(s[64..]);
        int i = 0;
        foreach (var offset in NormalOffsets.Concat(ZeroOffsets))
            BinaryPrimitives.WriteUInt64BigEndian(s[(MultifdFormat.FixedHeaderLength + 8 * i++)..], offset);
        return b;
    }
}
