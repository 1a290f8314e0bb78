using System.Buffers.Binary;
using System.Net.Sockets;

namespace BFMig.Transfer.Wire;

/// <summary>
/// "Which protocol do you speak?", asked of a peer's data port before bfmigd hands an intercepted
/// stream to a helper: a <see cref="FrameType.Probe"/> frame in clear, payload <c>"BFMP" be16
/// version</c>; the peer's bfmigd answers with the same frame carrying its own version and closes.
/// Decoding never depends on the version, and a longer payload (a later version's) is read past
/// its first six bytes, so any later bfmigd can answer any earlier one. A bfmigd from before the
/// probe (builds before protocol 9) refuses its first frame and closes without answering, which the
/// asker takes for a protocol it does not speak. Either way the stream is then carried straight
/// to the peer's QEMU at stock cost, not handed to a helper the peer would refuse (a failed migration).
/// </summary>
public static class VersionProbe
{
    private static ReadOnlySpan<byte> Magic => "BFMP"u8;

    /// <summary>Payload bytes this version sends: magic and version.</summary>
    public const int PayloadLength = 6;

    /// <summary>The whole frame this version sends, header included (question and answer alike).</summary>
    public const int FrameLength = FrameCodec.HeaderLength + PayloadLength;

    /// <summary>Largest payload read from a peer (a later version may add to the six bytes).</summary>
    public const int MaxPayloadLength = 64;

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
        if (frame.Length < FrameLength)
            throw new PeerProtocolException($"probe of {frame.Length} bytes is shorter than {FrameLength}");
        var header = FrameCodec.ParseHeader(frame[..FrameCodec.HeaderLength], 0);
        if (header.Type != FrameType.Probe || header.Codec != FrameCodecKind.None)
            throw new PeerProtocolException($"a {header.Type} frame ({header.Codec}), not a probe");
        if (header.WireLength != frame.Length - FrameCodec.HeaderLength || header.WireLength is < PayloadLength or > MaxPayloadLength)
            throw new PeerProtocolException($"probe payload of {header.WireLength} bytes in a frame of {frame.Length} (expected {PayloadLength} to {MaxPayloadLength})");
        var payload = frame[FrameCodec.HeaderLength..];
        if (!payload[..4].SequenceEqual(Magic))
            throw new PeerProtocolException($"probe magic {Convert.ToHexString(payload[..4])} is not BFMP");
        return BinaryPrimitives.ReadUInt16BigEndian(payload[4..]);
    }

    /// <summary>
    /// Reads one whole probe frame (header, then the payload it announces, at most
    /// <see cref="MaxPayloadLength"/>); null when the connection ends first. The caller bounds the wait with <paramref name="ct"/>.
    /// </summary>
    public static async Task<byte[]?> ReadFrameAsync(Socket socket, CancellationToken ct)
    {
        var header = new byte[FrameCodec.HeaderLength];
        if (!await FillAsync(socket, header, ct).ConfigureAwait(false))
            return null;
        int length = BinaryPrimitives.ReadInt32BigEndian(header.AsSpan(4));
        if (header[0] != (byte)FrameType.Probe || length is < PayloadLength or > MaxPayloadLength)
            throw new PeerProtocolException($"frame type 0x{header[0]:x2} of {(uint)length} bytes is not a probe");
        var frame = new byte[FrameCodec.HeaderLength + length];
        header.CopyTo(frame, 0);
        return await FillAsync(socket, frame.AsMemory(FrameCodec.HeaderLength), ct).ConfigureAwait(false) ? frame : null;
    }

    private static async Task<bool> FillAsync(Socket socket, Memory<byte> buffer, CancellationToken ct)
    {
        for (int read = 0; read < buffer.Length;)
        {
            int n = await socket.ReceiveAsync(buffer[read..], SocketFlags.None, ct).ConfigureAwait(false);
            if (n == 0)
                return false;
            read += n;
        }
        return true;
    }
}
