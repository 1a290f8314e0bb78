namespace BFMig.Transfer.Memory;

/// <summary>What a <see cref="QemuSegment"/> is.</summary>
public enum SegmentKind : byte
{
    /// <summary>Bytes to carry as they are.</summary>
    Raw,
    /// <summary>A PAGE record: <see cref="QemuSegment.HeaderLength"/> header bytes, then 4096 bytes of page content.</summary>
    Page,
    /// <summary>The MEM_SIZE block list is complete (zero bytes long): <see cref="QemuStreamParser.Blocks"/> is final.</summary>
    BlocksDefined,
    /// <summary>
    /// The parser stops understanding the stream here (zero bytes long, once): every later byte is
    /// <see cref="Raw"/>, and no page after it is recorded, so a digest taken now is final.
    /// </summary>
    OpaqueFromHere,
}

/// <summary>What a raw record says about a page's content.</summary>
public enum PageFact : byte
{
    None,
    /// <summary>The page is all zero (a ZERO record with fill byte 0).</summary>
    Zero,
    /// <summary>The page changed to content this parser does not reconstruct (XBZRLE, compressed, non-zero fill).</summary>
    Unknown,
}

/// <summary>
/// One piece of a QEMU migration stream. Concatenating the bytes of all segments in order gives
/// back the stream exactly.
/// </summary>
/// <param name="Kind">Raw bytes, a page record, or a zero-length marker.</param>
/// <param name="Length">Bytes of input this segment covers.</param>
/// <param name="Fact">For raw page records (ZERO, XBZRLE, ...), what they say about the page.</param>
/// <param name="BlockIndex">For page records: index into <see cref="QemuStreamParser.Blocks"/>.</param>
/// <param name="PageIndex">For page records: page number inside the block.</param>
/// <param name="Continue">For page records: the header used RAM_SAVE_FLAG_CONTINUE (no block idstr).</param>
/// <param name="HeaderLength">For page records: header bytes (be64 word and idstr) before the record body.</param>
public readonly record struct QemuSegment(SegmentKind Kind, int Length, PageFact Fact = PageFact.None, int BlockIndex = -1,
    long PageIndex = -1, bool Continue = false, int HeaderLength = 0);

/// <summary>One RAMBlock as announced by MEM_SIZE.</summary>
/// <param name="Name">The block's idstr (e.g. <c>pc.ram</c>).</param>
/// <param name="UsedLength">Bytes in use (a multiple of the page size).</param>
public sealed record RamBlockInfo(string Name, long UsedLength)
{
    /// <summary>The idstr as it appears on the wire.</summary>
    public byte[] NameBytes { get; } = System.Text.Encoding.UTF8.GetBytes(Name);

    /// <summary>Pages in the block.</summary>
    public long PageCount => UsedLength >> QemuFormat.PageShift;
}
