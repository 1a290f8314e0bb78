using System.Buffers.Binary;
using System.Buffers;

namespace BFMig.Transfer.Disk.Nbd;

/// <summary>
/// One transmission-phase request. <see cref="Payload"/> is a slice of the reader's buffer
/// (WRITE data, or a BLOCK_STATUS payload with extended headers); it is valid until the
/// caller consumes the input.
/// </summary>
public readonly record struct NbdRequest(
    NbdCommandFlags Flags,
    NbdCommand Command,
    ulong Cookie,
    ulong Offset,
    ulong Length,
    ReadOnlySequence<byte> Payload)
{
    /// <summary>Bytes of a compact request header.</summary>
    public const int CompactHeaderLength = 28;

    /// <summary>Bytes of an extended request header.</summary>
    public const int ExtendedHeaderLength = 32;

    /// <summary>Header length for a header style.</summary>
    public static int HeaderLength(bool extended) => extended ? ExtendedHeaderLength : CompactHeaderLength;

    /// <summary>
    /// Reads one request with its payload. Returns false, consuming nothing, while incomplete.
    /// Throws before waiting for a payload larger than <paramref name="maxPayload"/>.
    /// </summary>
    public static bool TryRead(ref ReadOnlySequence<byte> input, bool extended, int maxPayload, long offset, out NbdRequest request)
    {
        request = default;
        int headerLength = HeaderLength(extended);
        if (input.Length < headerLength)
            return false;
        var reader = new SequenceReader<byte>(input);
        reader.TryReadBigEndian(out int magic);
        reader.TryReadBigEndian(out short flags);
        reader.TryReadBigEndian(out short type);
        reader.TryReadBigEndian(out long cookie);
        reader.TryReadBigEndian(out long from);
        ulong length;
        if (extended)
        {
            reader.TryReadBigEndian(out long l);
            length = (ulong)l;
        }
        else
        {
            reader.TryReadBigEndian(out int l);
            length = (uint)l;
        }
        uint expectedMagic = extended ? NbdMagic.ExtendedRequest : NbdMagic.Request;
        if ((uint)magic != expectedMagic)
        {
            string what = (uint)magic == NbdMagic.Request || (uint)magic == NbdMagic.ExtendedRequest
                ? $"request magic 0x{(uint)magic:x8} does not match the negotiated header style ({(extended ? "extended" : "compact")})"
                : $"request magic 0x{(uint)magic:x8} is not 0x{expectedMagic:x8}";
            throw NbdProtocolException.At("request", offset, what);
        }
        var command = (NbdCommand)(ushort)type;
        if (command > NbdCommand.Resize)
            throw NbdProtocolException.At("request", offset + 6, $"unknown command type {(ushort)type} (cookie 0x{(ulong)cookie:x})");
        var commandFlags = (NbdCommandFlags)(ushort)flags;
        const NbdCommandFlags knownFlags = NbdCommandFlags.Fua | NbdCommandFlags.NoHole | NbdCommandFlags.DontFragment
            | NbdCommandFlags.RequestOne | NbdCommandFlags.FastZero | NbdCommandFlags.PayloadLength;
        if ((commandFlags & ~knownFlags) != 0)
            throw NbdProtocolException.At("request", offset + 4, $"unknown command flags 0x{(ushort)flags:x4} on {command}");
        ulong payloadLength = 0;
        if (command == NbdCommand.Write || (extended && (commandFlags & NbdCommandFlags.PayloadLength) != 0))
            payloadLength = length;
        if (payloadLength > (ulong)maxPayload)
            throw NbdProtocolException.At("request", offset + 24, $"{command} payload length {payloadLength} exceeds the limit {maxPayload}");
        if ((ulong)input.Length < (ulong)headerLength + payloadLength)
            return false;
        request = new NbdRequest(commandFlags, command, (ulong)cookie, (ulong)from, length, input.Slice(headerLength, (long)payloadLength));
        input = input.Slice(headerLength + (long)payloadLength);
        return true;
    }

    /// <summary>Writes the header of a request (no payload); returns its length.</summary>
    public static int WriteHeader(Span<byte> destination, bool extended, NbdCommandFlags flags, NbdCommand command, ulong cookie, ulong offset, ulong length)
    {
        BinaryPrimitives.WriteUInt32BigEndian(destination, extended ? NbdMagic.ExtendedRequest : NbdMagic.Request);
        BinaryPrimitives.WriteUInt16BigEndian(destination[4..], (ushort)flags);
        BinaryPrimitives.WriteUInt16BigEndian(destination[6..], (ushort)command);
        BinaryPrimitives.WriteUInt64BigEndian(destination[8..], cookie);
        BinaryPrimitives.WriteUInt64BigEndian(destination[16..], offset);
        if (extended)
        {
            BinaryPrimitives.WriteUInt64BigEndian(destination[24..], length);
            return ExtendedHeaderLength;
        }
        if (length > uint.MaxValue)
            throw new ArgumentOutOfRangeException(nameof(length), length, "compact headers carry a 32-bit length");
        BinaryPrimitives.WriteUInt32BigEndian(destination[24..], (uint)length);
        return CompactHeaderLength;
    }
}
