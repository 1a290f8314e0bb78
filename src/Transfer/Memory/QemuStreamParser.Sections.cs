using System.Buffers.Binary;
using System.Text;

namespace BFMig.Transfer.Memory;

// Decoding inside sections: dirty-bitmap chunks, configuration subsections, the RAM section's
// MEM_SIZE block list and page records. The state machine that picks which runs is in QemuStreamParser.cs.
public sealed partial class QemuStreamParser
{
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
                RamRound++;
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
