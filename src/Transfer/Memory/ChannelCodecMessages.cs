using System.Buffers.Binary;
using BFMig.Transfer.Wire;

namespace BFMig.Transfer.Memory;

/// <summary>Message types between a multifd channel's helper and its trip's <see cref="ChannelCodecService"/>.</summary>
internal enum CodecMessage : byte
{
    /// <summary>Channel -> service: <c>u8 role</c> (1 send, 2 receive).</summary>
    Open = 1,
    /// <summary>Service -> channel: the trip's store is ready for this channel.</summary>
    Ready = 2,
    /// <summary>Service -> channel: UTF-8 reason; the session ends.</summary>
    Refused = 3,
    /// <summary>Sending channel -> service: channel bytes from QEMU.</summary>
    Data = 4,
    /// <summary>Service -> sending channel: ops to frame as <see cref="FrameType.MultifdData"/>.</summary>
    Ops = 5,
    /// <summary>Receiving channel -> service: one <see cref="FrameType.MultifdData"/> payload.</summary>
    Frame = 6,
    /// <summary>Service -> receiving channel: rebuilt channel bytes for QEMU.</summary>
    Bytes = 7,
    /// <summary>Service -> receiving channel: the frame is fully rebuilt.</summary>
    FrameDone = 8,
    /// <summary>Channel -> service: the channel ended.</summary>
    Finish = 9,
    /// <summary>Service -> channel: everything is coded and recorded; <c>4 x be64</c> pages elided, referenced, delta, full.</summary>
    Done = 10,
    /// <summary>Service -> channel: UTF-8 reason; the channel must fail (the store work failed).</summary>
    Failed = 11,
}

/// <summary>
/// The framing on a channel's codec socket: <c>u8 type, be32 length, payload</c>. Both ends are
/// root (checked with SO_PEERCRED), but a length is still bounded before anything is allocated.
/// </summary>
internal static class CodecMessages
{
    /// <summary>The largest payload: a frame's ops, or one rebuilt output (<see cref="MigDecoder.OutputThreshold"/> and a frame's worth).</summary>
    public const int MaxPayload = MigDecoder.OutputThreshold + FrameCodec.MaxPayload + 2 * QemuFormat.PageSize;

    public static async ValueTask WriteAsync(Stream s, CodecMessage type, ReadOnlyMemory<byte> payload, CancellationToken ct)
    {
        if (payload.Length > MaxPayload) throw new ArgumentException($"codec message of {payload.Length} bytes");
        var header = new byte[5];
        header[0] = (byte)type;
        BinaryPrimitives.WriteUInt32BigEndian(header.AsSpan(1), (uint)payload.Length);
        await s.WriteAsync(header, ct);
        if (!payload.IsEmpty) await s.WriteAsync(payload, ct);
    }

    /// <summary>Reads one message into <paramref name="buffer"/> (grown as needed, up to <see cref="MaxPayload"/>); null at a clean end.</summary>
    public static async ValueTask<(CodecMessage Type, int Length)?> ReadAsync(Stream s, Ref<byte[]> buffer, CancellationToken ct)
    {
        var header = new byte[5];
        int got = 0;
        while (got < header.Length)
        {
            int n = await s.ReadAsync(header.AsMemory(got), ct);
            if (n == 0)
            {
                if (got == 0) return null;
                throw new PeerProtocolException("codec socket closed inside a message header");
            }
            got += n;
        }
        var type = (CodecMessage)header[0];
        uint length = BinaryPrimitives.ReadUInt32BigEndian(header.AsSpan(1));
        if (type is < CodecMessage.Open or > CodecMessage.Failed) throw new PeerProtocolException($"codec message of unknown type {header[0]}");
        if (length > MaxPayload) throw new PeerProtocolException($"codec message {type} of {length} bytes (at most {MaxPayload})");
        if (buffer.Value.Length < length) buffer.Value = new byte[Math.Max(length, Math.Min(MaxPayload, buffer.Value.Length * 2))];
        await s.ReadExactlyAsync(buffer.Value.AsMemory(0, (int)length), ct);
        return (type, (int)length);
    }

    public static byte[] EncodeCounts(TransferStats s)
    {
        var b = new byte[32];
        BinaryPrimitives.WriteInt64BigEndian(b, s.PagesElided);
        BinaryPrimitives.WriteInt64BigEndian(b.AsSpan(8), s.PagesReferenced);
        BinaryPrimitives.WriteInt64BigEndian(b.AsSpan(16), s.PagesDelta);
        BinaryPrimitives.WriteInt64BigEndian(b.AsSpan(24), s.PagesFull);
        return b;
    }

    public static void AddCounts(ReadOnlySpan<byte> b, TransferStats s)
    {
        if (b.Length != 32) throw new PeerProtocolException($"codec Done of {b.Length} bytes, expected 32");
        s.PagesElided += BinaryPrimitives.ReadInt64BigEndian(b);
        s.PagesReferenced += BinaryPrimitives.ReadInt64BigEndian(b[8..]);
        s.PagesDelta += BinaryPrimitives.ReadInt64BigEndian(b[16..]);
        s.PagesFull += BinaryPrimitives.ReadInt64BigEndian(b[24..]);
    }
}

/// <summary>A mutable box, so an async method can hand back a grown buffer.</summary>
internal sealed class Ref<T>(T value)
{
    public T Value { get; set; } = value;
}
