using System.Buffers.Binary;
using System.Text;

namespace BFMig.Transfer.Memory;

/// <summary>
/// Incremental parser of the QEMU migration main channel. It recognises the header, the
/// configuration section, section framing and the <c>ram</c> section's records, and cuts the
/// stream into <see cref="QemuSegment"/>s. It never fails: anything it does not understand (an
/// unknown section, a non-ram iterative section, odd MEM_SIZE extras, a multifd channel, postcopy
/// commands) switches it to opaque mode, where the rest is returned as raw bytes. Memory is
/// bounded: no segment is longer than <see cref="MaxRecordLength"/> except opaque raw bytes, which
/// are returned as they come.
/// </summary>
public sealed class QemuStreamParser
{
    /// <summary>The most input one call may need to see before it can produce a segment.</summary>
    public const int MaxRecordLength = 8 + 1 + 255 + 4 + 8192;

    private const int MaxBlocks = 4096;
    private const int MaxConfigNameLength = 256;

    private enum State { Header, SectionTop, ConfigSubsections, RamRecords, MemSizeBlocks, BitmapChunks, Opaque }

    private readonly List<RamBlockInfo> _blocks = [];
    private State _state = State.Header;
    private uint _ramSectionId = uint.MaxValue;
    private uint _bitmapSectionId = uint.MaxValue;
    private bool _ramInEndSection;
    private int _lastBlock = -1;
    private long _memSizeRemaining;
    private bool _blocksDefinedPending;
    private long _position;

    /// <summary>RAMBlocks announced by MEM_SIZE, in stream order.</summary>
    public IReadOnlyList<RamBlockInfo> Blocks => _blocks;

    /// <summary>True once the parser gave up understanding the stream and carries the rest as raw bytes.</summary>
    public bool IsOpaque => _state == State.Opaque;

    /// <summary>Why the parser went opaque (null while it still understands the stream).</summary>
    public string? OpaqueReason { get; private set; }

    /// <summary>True when the ram section's END records were all parsed: every page QEMU sent on this channel was seen.</summary>
    public bool RamComplete { get; private set; }

    /// <summary>Stream offset of the next byte this parser will look at.</summary>
    public long Position => _position;

    /// <summary>
    /// Produces the next segment from <paramref name="input"/> (which starts at <see cref="Position"/>).
    /// Returns false and consumes nothing when the input holds no complete segment yet; when
    /// <paramref name="isFinal"/> is set, a trailing incomplete record is returned as raw bytes.
    /// </summary>
    public bool TryRead(ReadOnlySpan<byte> input, bool isFinal, out QemuSegment segment)
    {
        if (_blocksDefinedPending)
        {
            _blocksDefinedPending = false;
            segment = new QemuSegment(SegmentKind.BlocksDefined, 0);
            return true;
        }
        if (_state != State.Opaque && TryParse(input, out segment))
        {
            _position += segment.Length;
            return true;
        }
        if (_state != State.Opaque && isFinal && input.Length > 0)
            GoOpaque($"stream ended inside a record at offset {_position}");
        if (_state == State.Opaque && input.Length > 0)
        {
            segment = new QemuSegment(SegmentKind.Raw, input.Length);
            _position += input.Length;
            return true;
        }
        segment = default;
        return false;
    }

    private void GoOpaque(string reason)
    {
        _state = State.Opaque;
        OpaqueReason ??= reason;
    }

    private static QemuSegment Raw(int length) => new(SegmentKind.Raw, length);

    // Returns false either for "need more input" or after switching to opaque (the caller tells them apart by _state).
    private bool TryParse(ReadOnlySpan<byte> input, out QemuSegment segment)
    {
        segment = default;
        switch (_state)
        {
            case State.Header:
                if (input.Length < 8) return false;
                uint magic = BinaryPrimitives.ReadUInt32BigEndian(input);
                uint version = BinaryPrimitives.ReadUInt32BigEndian(input[4..]);
                if (magic != QemuFormat.FileMagic)
                {
                    GoOpaque(magic == QemuFormat.MultifdMagic ? "multifd channel" : $"not a QEMU migration stream (magic 0x{magic:x8})");
                    return false;
                }
                if (version != QemuFormat.FileVersion)
                {
                    GoOpaque($"unsupported stream version {version}");
                    return false;
                }
                _state = State.SectionTop;
                segment = Raw(8);
                return true;
            case State.SectionTop:
            case State.ConfigSubsections:
                return TryParseSection(input, out segment);
            case State.RamRecords:
                return TryParseRamRecord(input, out segment);
            case State.MemSizeBlocks:
                return TryParseMemSizeBlock(input, out segment);
            case State.BitmapChunks:
                return TryParseBitmapChunk(input, out segment);
            default:
                return false;
        }
    }

    private bool TryParseSection(ReadOnlySpan<byte> input, out QemuSegment segment)
    {
        segment = default;
        if (input.Length < 1) return false;
        byte type = input[0];
        if (_state == State.ConfigSubsections && type != QemuFormat.Subsection)
            _state = State.SectionTop;
        switch (type)
        {
            case QemuFormat.Configuration:
            {
                if (input.Length < 5) return false;
                uint len = BinaryPrimitives.ReadUInt32BigEndian(input[1..]);
                if (len > MaxConfigNameLength)
                {
                    GoOpaque($"configuration name of {len} bytes at offset {_position}");
                    return false;
                }
                if (input.Length < 5 + (int)len) return false;
                _state = State.ConfigSubsections;
                segment = Raw(5 + (int)len);
                return true;
            }
            case QemuFormat.Subsection when _state == State.ConfigSubsections:
                return TryParseConfigSubsection(input, out segment);
            case QemuFormat.SectionStart:
            case QemuFormat.SectionFull:
            {
                if (input.Length < 6) return false;
                int idLen = input[5];
                if (input.Length < 6 + idLen + 8) return false;
                uint sectionId = BinaryPrimitives.ReadUInt32BigEndian(input[1..]);
                var idstr = input.Slice(6, idLen);
                if (type == QemuFormat.SectionFull)
                {
                    // Device state is not length-prefixed; in precopy no RAM follows it, so carry the rest as it is.
                    GoOpaque(RamComplete ? "device state" : $"device state section before ram completed at offset {_position}");
                    return false;
                }
                if (idstr.SequenceEqual("dirty-bitmap"u8) && _bitmapSectionId == uint.MaxValue)
                {
                    // Persistent bitmaps (libvirt checkpoints) migrate in their own iterative section,
                    // right after ram's setup: carry it as it is and keep parsing the pages that follow.
                    _bitmapSectionId = sectionId;
                    _state = State.BitmapChunks;
                    segment = Raw(6 + idLen + 8);
                    return true;
                }
                if (!idstr.SequenceEqual("ram"u8) || _ramSectionId != uint.MaxValue)
                {
                    GoOpaque($"iterative section '{Encoding.UTF8.GetString(idstr)}' not parsed (offset {_position})");
                    return false;
                }
                _ramSectionId = sectionId;
                _ramInEndSection = false;
                _state = State.RamRecords;
                segment = Raw(6 + idLen + 8);
                return true;
            }
            case QemuFormat.SectionPart:
            case QemuFormat.SectionEnd:
            {
                if (input.Length < 5) return false;
                uint sectionId = BinaryPrimitives.ReadUInt32BigEndian(input[1..]);
                if (sectionId == _bitmapSectionId)
                {
                    _state = State.BitmapChunks;
                    segment = Raw(5);
                    return true;
                }
                if (sectionId != _ramSectionId)
                {
                    GoOpaque($"section {sectionId} is not ram (offset {_position})");
                    return false;
                }
                _ramInEndSection = type == QemuFormat.SectionEnd;
                _state = State.RamRecords;
                segment = Raw(5);
                return true;
            }
            case QemuFormat.SectionFooter:
                if (input.Length < 5) return false;
                segment = Raw(5);
                return true;
            case QemuFormat.Command:
            {
                if (input.Length < 5) return false;
                ushort cmd = BinaryPrimitives.ReadUInt16BigEndian(input[1..]);
                ushort len = BinaryPrimitives.ReadUInt16BigEndian(input[3..]);
                // POSTCOPY_ADVISE also announces dirty-bitmap migration (libvirt checkpoints); only LISTEN/RUN would start postcopy.
                if (cmd is not (QemuFormat.CmdOpenReturnPath or QemuFormat.CmdPing or QemuFormat.CmdSwitchoverStart or QemuFormat.CmdPostcopyAdvise))
                {
                    GoOpaque($"command {cmd} (postcopy, packaged or colo) at offset {_position}");
                    return false;
                }
                // QEMU's own are 0 to 16 bytes; a longer one would break the segment bound (found by afl++).
                if (5 + len > MaxRecordLength)
                {
                    GoOpaque($"command {cmd} with a {len}-byte body at offset {_position}");
                    return false;
                }
                if (input.Length < 5 + len) return false;
                segment = Raw(5 + len);
                return true;
            }
            case QemuFormat.SectionEof:
                GoOpaque("end of stream");
                return false;
            default:
                GoOpaque($"section type 0x{type:x2} at offset {_position}");
                return false;
        }
    }

    /// <summary>
    /// One chunk of the <c>dirty-bitmap</c> section (QEMU migration/block-dirty-bitmap.c, same in
    /// 7.2 and 10.0): <c>u8 flags</c>; with DEVICE_NAME 0x08 and BITMAP_NAME 0x04 a counted name
    /// each; then START 0x10 <c>be32 granularity, u8 bitmap flags</c>, or COMPLETE 0x20 nothing,
    /// or BITS 0x40 <c>be64 first sector, be32 sectors</c> and unless ZEROES 0x02 <c>be64 size +
    /// data</c>. EOS 0x01 ends the section's chunks. Extra flag bytes (0x80) are never sent, so
    /// they turn the parser opaque, as does a chunk longer than <see cref="MaxRecordLength"/>.
    /// </summary>
    private bool TryParseBitmapChunk(ReadOnlySpan<byte> input, out QemuSegment segment)
    {
        const byte Eos = 0x01, Zeroes = 0x02, BitmapName = 0x04, DeviceName = 0x08, Start = 0x10, Complete = 0x20, Bits = 0x40, Extra = 0x80;
        segment = default;
        if (input.Length < 1) return false;
        byte flags = input[0];
        if ((flags & Extra) != 0)
        {
            GoOpaque($"dirty-bitmap chunk with extra flags 0x{flags:x2} at offset {_position}");
            return false;
        }
        int p = 1;
        foreach (var name in (ReadOnlySpan<byte>)[DeviceName, BitmapName])
        {
            if ((flags & name) == 0) continue;
            if (input.Length < p + 1) return false;
            p += 1 + input[p];
        }
        if ((flags & Start) != 0)
        {
            p += 5;
        }
        else if ((flags & Complete) == 0 && (flags & Bits) != 0)
        {
            p += 12;
            if ((flags & Zeroes) == 0)
            {
                if (input.Length < p + 8) return false;
                ulong size = BinaryPrimitives.ReadUInt64BigEndian(input[p..]);
                if (size > MaxRecordLength)
                {
                    GoOpaque($"dirty-bitmap chunk of {size} bytes at offset {_position}");
                    return false;
                }
                p += 8 + (int)size;
            }
        }
        if (input.Length < p) return false;
        if ((flags & Eos) != 0)
            _state = State.SectionTop;
        segment = Raw(p);
        return true;
    }

    private bool TryParseConfigSubsection(ReadOnlySpan<byte> input, out QemuSegment segment)
    {
        segment = default;
        if (input.Length < 2) return false;
        int nameLen = input[1];
        int head = 2 + nameLen + 4;
        if (input.Length < head) return false;
        var name = input.Slice(2, nameLen);
        int bodyLen;
        if (name.SequenceEqual("configuration/target-page-bits"u8))
        {
            bodyLen = 4;
            if (input.Length < head + 4) return false;
            if (BinaryPrimitives.ReadUInt32BigEndian(input[head..]) != QemuFormat.PageShift)
            {
                GoOpaque("target page size is not 4096");
                return false;
            }
        }
        else if (name.SequenceEqual("configuration/uuid"u8))
        {
            bodyLen = 16;
        }
        else if (name.SequenceEqual("configuration/capabilities"u8))
        {
            if (input.Length < head + 4) return false;
            uint count = BinaryPrimitives.ReadUInt32BigEndian(input[head..]);
            if (count > 64)
            {
                GoOpaque($"{count} capabilities in configuration");
                return false;
            }
            int pos = head + 4;
            for (uint i = 0; i < count; i++)
            {
                if (input.Length < pos + 1) return false;
                int len = input[pos];
                if (input.Length < pos + 1 + len) return false;
                var cap = input.Slice(pos + 1, len);
                // x-ignore-shared adds an address to each MEM_SIZE entry and skips shared blocks: not parsed.
                if (cap.SequenceEqual("x-ignore-shared"u8) || cap.SequenceEqual("mapped-ram"u8))
                {
                    GoOpaque($"capability {Encoding.UTF8.GetString(cap)}");
                    return false;
                }
                pos += 1 + len;
            }
            bodyLen = pos - head;
        }
        else
        {
            GoOpaque($"configuration subsection '{Encoding.UTF8.GetString(name)}'");
            return false;
        }
        if (input.Length < head + bodyLen) return false;
        segment = Raw(head + bodyLen);
        return true;
    }

    private bool TryParseMemSizeBlock(ReadOnlySpan<byte> input, out QemuSegment segment)
    {
        segment = default;
        if (input.Length < 1) return false;
        int len = input[0];
        if (input.Length < 1 + len + 8) return false;
        var name = input.Slice(1, len);
        long used = (long)BinaryPrimitives.ReadUInt64BigEndian(input[(1 + len)..]);
        if (len == 0 || used <= 0 || (used & (QemuFormat.PageSize - 1)) != 0 || used > _memSizeRemaining
            || _blocks.Count >= MaxBlocks || name.IndexOfAnyInRange((byte)0, (byte)31) >= 0 || FindBlock(name) >= 0)
        {
            GoOpaque($"MEM_SIZE block entry not understood at offset {_position}");
            return false;
        }
        _blocks.Add(new RamBlockInfo(Encoding.UTF8.GetString(name), used));
        _memSizeRemaining -= used;
        if (_memSizeRemaining == 0)
        {
            _state = State.RamRecords;
            _blocksDefinedPending = true;
        }
        segment = Raw(1 + len + 8);
        return true;
    }

    private int FindBlock(ReadOnlySpan<byte> name)
    {
        for (int i = 0; i < _blocks.Count; i++)
        {
            if (name.SequenceEqual(_blocks[i].NameBytes)) return i;
        }
        return -1;
    }

    private bool TryParseRamRecord(ReadOnlySpan<byte> input, out QemuSegment segment)
    {
        segment = default;
        if (input.Length < 8) return false;
        ulong word = BinaryPrimitives.ReadUInt64BigEndian(input);
        ulong flags = word & QemuFormat.FlagMask;
        long addr = (long)(word & ~QemuFormat.FlagMask);
        bool cont = (flags & QemuFormat.FlagContinue) != 0;
        ulong kind = flags & ~QemuFormat.FlagContinue;

        switch (kind)
        {
            case QemuFormat.FlagMemSize:
                if (_blocks.Count != 0 || addr <= 0)
                {
                    GoOpaque($"unexpected MEM_SIZE at offset {_position}");
                    return false;
                }
                _memSizeRemaining = addr;
                _state = State.MemSizeBlocks;
                segment = Raw(8);
                return true;
            case QemuFormat.FlagEos:
                _state = State.SectionTop;
                if (_ramInEndSection) RamComplete = true;
                segment = Raw(8);
                return true;
            case QemuFormat.FlagMultifdFlush:
                segment = Raw(8);
                return true;
            case QemuFormat.FlagZero:
            case QemuFormat.FlagPage:
            case QemuFormat.FlagXbzrle:
            case QemuFormat.FlagCompressPage:
                break;
            default:
                GoOpaque($"ram record flags 0x{flags:x} at offset {_position}");
                return false;
        }

        int pos = 8;
        int block;
        if (cont)
        {
            block = _lastBlock;
            if (block < 0)
            {
                GoOpaque($"CONTINUE without a previous block at offset {_position}");
                return false;
            }
        }
        else
        {
            if (input.Length < 9) return false;
            int len = input[8];
            if (input.Length < 9 + len) return false;
            block = FindBlock(input.Slice(9, len));
            if (block < 0)
            {
                GoOpaque($"page record names unknown block '{Encoding.UTF8.GetString(input.Slice(9, len))}' at offset {_position}");
                return false;
            }
            pos = 9 + len;
        }
        if (addr >= _blocks[block].UsedLength)
        {
            GoOpaque($"page offset 0x{addr:x} beyond block '{_blocks[block].Name}' at offset {_position}");
            return false;
        }
        long page = addr >> QemuFormat.PageShift;

        switch (kind)
        {
            case QemuFormat.FlagPage:
                if (input.Length < pos + QemuFormat.PageSize) return false;
                _lastBlock = block;
                segment = new QemuSegment(SegmentKind.Page, pos + QemuFormat.PageSize, PageFact.None, block, page, cont, pos);
                return true;
            case QemuFormat.FlagZero:
                if (input.Length < pos + 1) return false;
                _lastBlock = block;
                segment = new QemuSegment(SegmentKind.Raw, pos + 1, input[pos] == 0 ? PageFact.Zero : PageFact.Unknown, block, page, cont, pos);
                return true;
            case QemuFormat.FlagXbzrle:
            {
                if (input.Length < pos + 3) return false;
                int len = BinaryPrimitives.ReadUInt16BigEndian(input[(pos + 1)..]);
                if (input[pos] != QemuFormat.XbzrleEncoding || len > QemuFormat.PageSize)
                {
                    GoOpaque($"xbzrle header (flags {input[pos]}, length {len}) at offset {_position}");
                    return false;
                }
                if (input.Length < pos + 3 + len) return false;
                _lastBlock = block;
                segment = new QemuSegment(SegmentKind.Raw, pos + 3 + len, PageFact.Unknown, block, page, cont, pos);
                return true;
            }
            default: // COMPRESS_PAGE (QEMU < 9.1): be32 length + zlib data
            {
                if (input.Length < pos + 4) return false;
                uint len = BinaryPrimitives.ReadUInt32BigEndian(input[pos..]);
                if (len > 8192)
                {
                    GoOpaque($"compressed page of {len} bytes at offset {_position}");
                    return false;
                }
                if (input.Length < pos + 4 + (int)len) return false;
                _lastBlock = block;
                segment = new QemuSegment(SegmentKind.Raw, pos + 4 + (int)len, PageFact.Unknown, block, page, cont, pos);
                return true;
            }
        }
    }
}
