using System.Buffers.Binary;
using System.Buffers;

namespace BFMig.Transfer.Disk.Nbd;

/// <summary>
/// Readers and writers for the fixed-newstyle handshake messages. Every <c>TryRead</c> consumes
/// nothing and returns false while the message is incomplete; it throws
/// <see cref="NbdProtocolException"/> naming stream, byte offset and field when the bytes are wrong.
/// </summary>
public static class NbdHandshake
{
    /// <summary>Bytes of the server greeting: NBDMAGIC, IHAVEOPT, u16 handshake flags.</summary>
    public const int GreetingLength = 18;

    /// <summary>Header of a client option: IHAVEOPT, u32 option, u32 length.</summary>
    public const int OptionHeaderLength = 16;

    /// <summary>Header of an option reply: magic, u32 option, u32 type, u32 length.</summary>
    public const int OptionReplyHeaderLength = 20;

    /// <summary>Largest option or option-reply payload accepted (the spec caps strings at 4096 bytes; lists of contexts stay far below this).</summary>
    public const int MaxOptionDataLength = 1 << 20;

    /// <summary>Reads the server greeting.</summary>
    public static bool TryReadGreeting(ref ReadOnlySequence<byte> input, long offset, out NbdHandshakeFlags flags)
    {
        flags = default;
        if (input.Length < GreetingLength)
            return false;
        var reader = new SequenceReader<byte>(input);
        reader.TryReadBigEndian(out long init);
        reader.TryReadBigEndian(out long opt);
        reader.TryReadBigEndian(out short raw);
        if ((ulong)init != NbdMagic.Init)
            throw NbdProtocolException.At("server greeting", offset, $"magic 0x{(ulong)init:x16} is not NBDMAGIC");
        if ((ulong)opt == NbdMagic.OldStyle)
            throw NbdProtocolException.At("server greeting", offset + 8, "oldstyle negotiation is not supported");
        if ((ulong)opt != NbdMagic.HaveOpt)
            throw NbdProtocolException.At("server greeting", offset + 8, $"magic 0x{(ulong)opt:x16} is not IHAVEOPT");
        flags = (NbdHandshakeFlags)(ushort)raw;
        if ((flags & NbdHandshakeFlags.FixedNewstyle) == 0)
            throw NbdProtocolException.At("server greeting", offset + 16, $"handshake flags 0x{(ushort)flags:x4} lack FIXED_NEWSTYLE");
        input = input.Slice(GreetingLength);
        return true;
    }

    /// <summary>Writes the server greeting.</summary>
    public static void WriteGreeting(Span<byte> destination, NbdHandshakeFlags flags)
    {
        BinaryPrimitives.WriteUInt64BigEndian(destination, NbdMagic.Init);
        BinaryPrimitives.WriteUInt64BigEndian(destination[8..], NbdMagic.HaveOpt);
        BinaryPrimitives.WriteUInt16BigEndian(destination[16..], (ushort)flags);
    }

    /// <summary>Reads the client's answer to the greeting.</summary>
    public static bool TryReadClientFlags(ref ReadOnlySequence<byte> input, long offset, out NbdClientFlags flags)
    {
        flags = default;
        if (input.Length < 4)
            return false;
        var reader = new SequenceReader<byte>(input);
        reader.TryReadBigEndian(out int raw);
        flags = (NbdClientFlags)(uint)raw;
        const NbdClientFlags known = NbdClientFlags.FixedNewstyle | NbdClientFlags.NoZeroes;
        if ((flags & ~known) != 0)
            throw NbdProtocolException.At("client flags", offset, $"unknown client flags 0x{(uint)flags:x8}");
        input = input.Slice(4);
        return true;
    }

    /// <summary>Reads one client option with its data.</summary>
    public static bool TryReadOption(ref ReadOnlySequence<byte> input, long offset, out NbdOptionRequest option)
    {
        option = default;
        if (input.Length < OptionHeaderLength)
            return false;
        var reader = new SequenceReader<byte>(input);
        reader.TryReadBigEndian(out long magic);
        reader.TryReadBigEndian(out int type);
        reader.TryReadBigEndian(out int length);
        if ((ulong)magic != NbdMagic.HaveOpt)
            throw NbdProtocolException.At("client option", offset, $"magic 0x{(ulong)magic:x16} is not IHAVEOPT");
        if ((uint)length > MaxOptionDataLength)
            throw NbdProtocolException.At("client option", offset + 12, $"option {(uint)type} data length {(uint)length} exceeds {MaxOptionDataLength}");
        if (input.Length < OptionHeaderLength + length)
            return false;
        option = new NbdOptionRequest((NbdOption)(uint)type, input.Slice(OptionHeaderLength, length));
        input = input.Slice(OptionHeaderLength + length);
        return true;
    }

    /// <summary>Writes an option header; the caller appends <paramref name="dataLength"/> bytes of data.</summary>
    public static void WriteOptionHeader(Span<byte> destination, NbdOption option, int dataLength)
    {
        BinaryPrimitives.WriteUInt64BigEndian(destination, NbdMagic.HaveOpt);
        BinaryPrimitives.WriteUInt32BigEndian(destination[8..], (uint)option);
        BinaryPrimitives.WriteUInt32BigEndian(destination[12..], (uint)dataLength);
    }

    /// <summary>Reads one option reply with its data.</summary>
    public static bool TryReadOptionReply(ref ReadOnlySequence<byte> input, long offset, out NbdOptionReply reply)
    {
        reply = default;
        if (input.Length < OptionReplyHeaderLength)
            return false;
        var reader = new SequenceReader<byte>(input);
        reader.TryReadBigEndian(out long magic);
        reader.TryReadBigEndian(out int option);
        reader.TryReadBigEndian(out int type);
        reader.TryReadBigEndian(out int length);
        if ((ulong)magic != NbdMagic.OptionReply)
            throw NbdProtocolException.At("option reply", offset, $"magic 0x{(ulong)magic:x16} is not the option reply magic");
        if ((uint)length > MaxOptionDataLength)
            throw NbdProtocolException.At("option reply", offset + 16, $"reply data length {(uint)length} exceeds {MaxOptionDataLength}");
        if (input.Length < OptionReplyHeaderLength + length)
            return false;
        reply = new NbdOptionReply((NbdOption)(uint)option, (NbdOptionReplyType)(uint)type, input.Slice(OptionReplyHeaderLength, length));
        input = input.Slice(OptionReplyHeaderLength + length);
        return true;
    }

    /// <summary>Writes an option reply header; the caller appends <paramref name="dataLength"/> bytes.</summary>
    public static void WriteOptionReplyHeader(Span<byte> destination, NbdOption option, NbdOptionReplyType type, int dataLength)
    {
        BinaryPrimitives.WriteUInt64BigEndian(destination, NbdMagic.OptionReply);
        BinaryPrimitives.WriteUInt32BigEndian(destination[8..], (uint)option);
        BinaryPrimitives.WriteUInt32BigEndian(destination[12..], (uint)type);
        BinaryPrimitives.WriteUInt32BigEndian(destination[16..], (uint)dataLength);
    }

    /// <summary>Reads the server's answer to NBD_OPT_EXPORT_NAME (size, flags, 124 zero bytes unless NO_ZEROES).</summary>
    public static bool TryReadExportNameReply(ref ReadOnlySequence<byte> input, bool noZeroes, out ulong size, out NbdTransmissionFlags flags)
    {
        size = 0;
        flags = default;
        int length = noZeroes ? 10 : 134;
        if (input.Length < length)
            return false;
        var reader = new SequenceReader<byte>(input);
        reader.TryReadBigEndian(out long rawSize);
        reader.TryReadBigEndian(out short rawFlags);
        size = (ulong)rawSize;
        flags = (NbdTransmissionFlags)(ushort)rawFlags;
        input = input.Slice(length);
        return true;
    }

    /// <summary>Parses the NBD_INFO_EXPORT payload of an NBD_REP_INFO reply, if that is what it is.</summary>
    public static bool TryParseExportInfo(ReadOnlySequence<byte> data, long offset, out ulong size, out NbdTransmissionFlags flags)
    {
        size = 0;
        flags = default;
        var reader = new SequenceReader<byte>(data);
        if (!reader.TryReadBigEndian(out short infoType))
            throw NbdProtocolException.At("option reply", offset, "NBD_REP_INFO without an info type");
        if ((NbdInfoType)(ushort)infoType != NbdInfoType.Export)
            return false;
        if (data.Length != 12)
            throw NbdProtocolException.At("option reply", offset, $"NBD_INFO_EXPORT length {data.Length} is not 12");
        reader.TryReadBigEndian(out long rawSize);
        reader.TryReadBigEndian(out short rawFlags);
        size = (ulong)rawSize;
        flags = (NbdTransmissionFlags)(ushort)rawFlags;
        return true;
    }
}

/// <summary>One option the client sent (data is a slice of the input buffer: copy it to keep it).</summary>
public readonly record struct NbdOptionRequest(NbdOption Option, ReadOnlySequence<byte> Data);

/// <summary>One option reply the server sent (data is a slice of the input buffer).</summary>
public readonly record struct NbdOptionReply(NbdOption Option, NbdOptionReplyType Type, ReadOnlySequence<byte> Data)
{
    /// <summary>True for the error replies (bit 31).</summary>
    public bool IsError => ((uint)Type & 0x80000000) != 0;

    /// <summary>True when no further reply to this option follows.</summary>
    public bool IsFinal => IsError || Type == NbdOptionReplyType.Ack;
}
