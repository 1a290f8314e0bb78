using System.Buffers.Binary;
using System.Buffers;

namespace BFMig.Transfer.Disk.Nbd;

/// <summary>Form of a reply header on the wire.</summary>
public enum NbdReplyKind
{
    Simple,
    Structured,
    Extended,
}

/// <summary>
/// The header of one reply (a simple reply, or one chunk of a structured/extended reply).
/// The payload of a simple READ reply is not self-describing: its length is that of the request.
/// </summary>
public readonly record struct NbdReplyHeader(
    NbdReplyKind Kind,
    ushort Flags,
    NbdReplyChunkType ChunkType,
    uint Error,
    ulong Cookie,
    ulong Offset,
    ulong PayloadLength)
{
    /// <summary>Bytes of a simple reply header.</summary>
    public const int SimpleLength = 16;

    /// <summary>Bytes of a structured chunk header.</summary>
    public const int StructuredLength = 20;

    /// <summary>Bytes of an extended chunk header.</summary>
    public const int ExtendedLength = 32;

    /// <summary>Offset of the cookie in every header form (what a proxy rewrites).</summary>
    public const int CookieOffset = 8;

    /// <summary>Length of this header on the wire.</summary>
    public int HeaderLength => Kind switch
    {
        NbdReplyKind.Simple => SimpleLength,
        NbdReplyKind.Structured => StructuredLength,
        _ => ExtendedLength,
    };

    /// <summary>True when this header ends the reply to its cookie.</summary>
    public bool IsLast => Kind == NbdReplyKind.Simple || (Flags & NbdReplyFlags.Done) != 0;

    /// <summary>True for an error chunk (type bit 15).</summary>
    public bool IsErrorChunk => Kind != NbdReplyKind.Simple && ((ushort)ChunkType & 0x8000) != 0;

    /// <summary>
    /// Parses a reply header without consuming anything. Returns false while the header is
    /// incomplete. Checks that the form matches <paramref name="style"/> and that a chunk payload
    /// stays within <paramref name="maxPayload"/>.
    /// </summary>
    public static bool TryPeek(ReadOnlySequence<byte> input, NbdHeaderStyle style, int maxPayload, long offset, out NbdReplyHeader header)
    {
        header = default;
        if (input.Length < 4)
            return false;
        var reader = new SequenceReader<byte>(input);
        reader.TryReadBigEndian(out int rawMagic);
        uint magic = (uint)rawMagic;
        switch (magic)
        {
            case NbdMagic.SimpleReply:
                if (style == NbdHeaderStyle.Extended)
                    throw NbdProtocolException.At("reply", offset, "simple reply after extended headers were negotiated");
                if (input.Length < SimpleLength)
                    return false;
                reader.TryReadBigEndian(out int error);
                reader.TryReadBigEndian(out long cookie);
                header = new NbdReplyHeader(NbdReplyKind.Simple, 0, NbdReplyChunkType.None, (uint)error, (ulong)cookie, 0, 0);
                return true;
            case NbdMagic.StructuredReply:
            case NbdMagic.ExtendedReply:
                bool extended = magic == NbdMagic.ExtendedReply;
                if (style == NbdHeaderStyle.Compact)
                    throw NbdProtocolException.At("reply", offset, $"chunk magic 0x{magic:x8} but structured replies were not negotiated");
                if (extended != (style == NbdHeaderStyle.Extended))
                    throw NbdProtocolException.At("reply", offset, $"chunk magic 0x{magic:x8} does not match the negotiated header style {style}");
                if (input.Length < (extended ? ExtendedLength : StructuredLength))
                    return false;
                reader.TryReadBigEndian(out short flags);
                reader.TryReadBigEndian(out short type);
                reader.TryReadBigEndian(out long chunkCookie);
                ulong chunkOffset = 0;
                ulong length;
                if (extended)
                {
                    reader.TryReadBigEndian(out long o);
                    reader.TryReadBigEndian(out long l);
                    chunkOffset = (ulong)o;
                    length = (ulong)l;
                }
                else
                {
                    reader.TryReadBigEndian(out int l);
                    length = (uint)l;
                }
                if (((ushort)flags & ~NbdReplyFlags.Done) != 0)
                    throw NbdProtocolException.At("reply", offset + 4, $"unknown reply flags 0x{(ushort)flags:x4} (cookie 0x{(ulong)chunkCookie:x})");
                if (length > (ulong)maxPayload)
                    throw NbdProtocolException.At("reply", offset + (extended ? 24 : 16), $"chunk payload length {length} exceeds the limit {maxPayload} (cookie 0x{(ulong)chunkCookie:x})");
                header = new NbdReplyHeader(extended ? NbdReplyKind.Extended : NbdReplyKind.Structured, (ushort)flags, (NbdReplyChunkType)(ushort)type, 0, (ulong)chunkCookie, chunkOffset, length);
                return true;
            default:
                throw NbdProtocolException.At("reply", offset, $"reply magic 0x{magic:x8} is not a simple, structured or extended reply");
        }
    }

    /// <summary>Writes a simple reply header.</summary>
    public static int WriteSimple(Span<byte> destination, uint error, ulong cookie)
    {
        BinaryPrimitives.WriteUInt32BigEndian(destination, NbdMagic.SimpleReply);
        BinaryPrimitives.WriteUInt32BigEndian(destination[4..], error);
        BinaryPrimitives.WriteUInt64BigEndian(destination[8..], cookie);
        return SimpleLength;
    }

    /// <summary>Writes a structured (compact) or extended chunk header; returns its length.</summary>
    public static int WriteChunk(Span<byte> destination, bool extended, ushort flags, NbdReplyChunkType type, ulong cookie, ulong offset, ulong payloadLength)
    {
        BinaryPrimitives.WriteUInt32BigEndian(destination, extended ? NbdMagic.ExtendedReply : NbdMagic.StructuredReply);
        BinaryPrimitives.WriteUInt16BigEndian(destination[4..], flags);
        BinaryPrimitives.WriteUInt16BigEndian(destination[6..], (ushort)type);
        BinaryPrimitives.WriteUInt64BigEndian(destination[8..], cookie);
        if (extended)
        {
            BinaryPrimitives.WriteUInt64BigEndian(destination[16..], offset);
            BinaryPrimitives.WriteUInt64BigEndian(destination[24..], payloadLength);
            return ExtendedLength;
        }
        BinaryPrimitives.WriteUInt32BigEndian(destination[16..], checked((uint)payloadLength));
        return StructuredLength;
    }

    /// <summary>
    /// Writes a complete one-message reply that ends a request with <paramref name="error"/> (0 = success),
    /// in the form the negotiated style requires. Returns the bytes written (at most 38).
    /// </summary>
    public static int WriteCompletion(Span<byte> destination, NbdHeaderStyle style, ulong cookie, ulong requestOffset, uint error)
    {
        if (style == NbdHeaderStyle.Compact || (style == NbdHeaderStyle.Structured && error == 0))
            return WriteSimple(destination, error, cookie);
        bool extended = style == NbdHeaderStyle.Extended;
        if (error == 0)
            return WriteChunk(destination, extended, NbdReplyFlags.Done, NbdReplyChunkType.None, cookie, requestOffset, 0);
        int n = WriteChunk(destination, extended, NbdReplyFlags.Done, NbdReplyChunkType.Error, cookie, requestOffset, 6);
        BinaryPrimitives.WriteUInt32BigEndian(destination[n..], error);
        BinaryPrimitives.WriteUInt16BigEndian(destination[(n + 4)..], 0);
        return n + 6;
    }

    /// <summary>Reads the errno of an error chunk payload.</summary>
    public static uint ParseChunkError(ReadOnlySequence<byte> payload, long offset)
    {
        var reader = new SequenceReader<byte>(payload);
        if (payload.Length < 6 || !reader.TryReadBigEndian(out int error))
            throw NbdProtocolException.At("reply", offset, $"error chunk payload of {payload.Length} bytes is shorter than 6");
        return error == 0 ? NbdError.IO : (uint)error;
    }
}
