using System.Buffers.Binary;

namespace BFMig.Transfer.Wire;

/// <summary>
/// "Which protocol do you speak?", asked of a peer's data port before bfmigd hands an intercepted
/// stream to a helper: a <see cref="FrameType.Probe"/> frame in clear, payload <c>"BFMP" be16
/// version</c>; the peer's bfmigd answers with the same frame carrying its own version and closes.
/// Decoding never depends on the version, so any later bfmigd can answer any earlier one. A
/// bfmigd from before the probe refuses its first frame and closes without answering, which the
/// asker takes for a protocol it does not speak. Either way the stream is then carried straight
/// to the peer's QEMU at stock cost, not handed to a helper the peer would refuse (a failed migration).
/// </summary>
public static class VersionProbe
{
    private static ReadOnlySpan<byte> Magic => "BFMP"u8;

    /// <summary>Payload bytes: magic and version.</summary>
    public const int PayloadLength = 6;

    /// <summary>The whole frame, header included (question and answer alike).</summary>
    public const int FrameLength = FrameCodec.HeaderLength + PayloadLength;

    /// <summary>The frame saying <paramref name="version"/>.</summary>
    public static byte[] Encode(ushort version)
    {
        var frame = new byte[FrameLength];
        FrameCodec.WriteHeader(frame, FrameType.Probe, FrameCodecKind.None, PayloadLength);
        Magic.CopyTo(frame.AsSpan(FrameCodec.HeaderLength));
        BinaryPrimitives.WriteUInt16BigEndian(frame.AsSpan(FrameCodec.HeaderLength + 4), version);
        return frame;
    }

    /// <summary>The version a whole probe frame says; throws <see cref="PeerProtocolException"/> naming what is wrong.</summary>
    public static ushort Decode(ReadOnlySpan<byte> frame)
    {
        if (frame.Length != FrameLength)
            throw new PeerProtocolException($"probe of {frame.Length} bytes, expected {FrameLength}");
        var header = FrameCodec.ParseHeader(frame[..FrameCodec.HeaderLength], 0);
        if (header.Type != FrameType.Probe || header.Codec != FrameCodecKind.None || header.WireLength != PayloadLength)
            throw new PeerProtocolException($"answer is a {header.Type} frame ({header.Codec}, {header.WireLength} bytes), not a probe");
        var payload = frame[FrameCodec.HeaderLength..];
        if (!payload[..4].SequenceEqual(Magic))
            throw new PeerProtocolException($"probe magic {Convert.ToHexString(payload[..4])} is not BFMP");
        return BinaryPrimitives.ReadUInt16BigEndian(payload[4..]);
    }
}
