using System.Buffers.Binary;
using System.Text;

namespace BFMig.Transfer.Wire;

/// <summary>
/// What a receiving daemon needs to hand a peer connection to the right helper: guest, stream
/// kind and sending host. With a pre-shared key the hello itself says it (in clear); with TLS the
/// hello is encrypted, so the sending helper first sends this in a <see cref="FrameType.Route"/>
/// frame: <c>"BFMR" u16 version, u8 kind, 16 guest uuid (RFC 4122 byte order), u8 name length +
/// sender name [, be16 target port]</c>. It proves nothing: the receiving helper checks the TLS
/// peer and that the hello inside names the same guest and kind. A transparent-mode stream (one
/// bfmigd intercepted on its way to a plain <c>tcp://</c> migration port) names the port it was
/// aimed at, in both authentication modes; the receiving daemon connects there only if the
/// incoming guest's own QEMU listens on it.
/// </summary>
public sealed record RouteRequest(StreamKind Kind, Guid Guest, string SenderName)
{
    /// <summary>Transparent mode: the TCP port on the receiving host that the stream was aimed at; 0 = explicit mode (the socket path).</summary>
    public ushort TargetPort { get; init; }

    /// <summary>Decoded from a route frame (true) or implied by a hello (false): the receiving helper must then read the route first.</summary>
    public bool FromRouteFrame { get; init; }

    /// <summary>The protocol version the route is written in: this helper's, or the peer's for a decoded one (so that it encodes to its own bytes).</summary>
    public ushort Version { get; init; } = FrameCodec.ProtocolVersion;

    private static ReadOnlySpan<byte> Magic => "BFMR"u8;

    /// <summary>Largest payload (a 255-byte name).</summary>
    public const int MaxLength = 24 + 255 + 2;

    /// <summary>The route a hello implies (pre-shared key mode).</summary>
    public static RouteRequest From(Hello hello) => new(hello.Kind, hello.Guest, hello.SenderName);

    public byte[] Encode()
    {
        var name = Encoding.UTF8.GetBytes(SenderName);
        if (name.Length > 255) throw new ArgumentException("sender name longer than 255 bytes");
        var b = new byte[24 + name.Length + (TargetPort != 0 ? 2 : 0)];
        Magic.CopyTo(b);
        BinaryPrimitives.WriteUInt16BigEndian(b.AsSpan(4), Version);
        b[6] = (byte)Kind;
        Guest.TryWriteBytes(b.AsSpan(7), bigEndian: true, out _);
        b[23] = (byte)name.Length;
        name.CopyTo(b, 24);
        if (TargetPort != 0)
            BinaryPrimitives.WriteUInt16BigEndian(b.AsSpan(24 + name.Length), TargetPort);
        return b;
    }

    /// <summary>Decodes a route payload; throws <see cref="PeerProtocolException"/> naming the bad field.</summary>
    public static RouteRequest Decode(ReadOnlySpan<byte> p)
    {
        if (p.Length < 24) throw new PeerProtocolException($"route of {p.Length} bytes is shorter than 24");
        if (!p[..4].SequenceEqual(Magic)) throw new PeerProtocolException($"route magic {Convert.ToHexString(p[..4])} is not BFMR");
        ushort version = BinaryPrimitives.ReadUInt16BigEndian(p[4..]);
        FrameCodec.RequirePeerVersion(version);
        byte kind = p[6];
        if (kind is not ((byte)StreamKind.Mig or (byte)StreamKind.Nbd or (byte)StreamKind.Control)) throw new PeerProtocolException($"route names unknown stream kind {kind} at byte 6");
        int nameLen = p[23];
        if (p.Length != 24 + nameLen && p.Length != 24 + nameLen + 2)
            throw new PeerProtocolException($"route of {p.Length} bytes, expected {24 + nameLen} or {24 + nameLen + 2} (with a target port)");
        ushort port = p.Length == 24 + nameLen ? (ushort)0 : BinaryPrimitives.ReadUInt16BigEndian(p[(24 + nameLen)..]);
        if (p.Length == 24 + nameLen + 2 && port == 0) throw new PeerProtocolException($"route names target port 0 at byte {24 + nameLen}");
        return new RouteRequest((StreamKind)kind, new Guid(p.Slice(7, 16), bigEndian: true), Encoding.UTF8.GetString(p.Slice(24, nameLen)))
        {
            TargetPort = port,
            FromRouteFrame = true,
            Version = version,
        };
    }

    /// <summary>Writes the route frame (uncompressed) to the raw connection.</summary>
    public async Task WriteAsync(Stream transport, CancellationToken ct)
    {
        var payload = Encode();
        var frame = new byte[FrameCodec.HeaderLength + payload.Length];
        frame[0] = (byte)FrameType.Route;
        BinaryPrimitives.WriteUInt32BigEndian(frame.AsSpan(4), (uint)payload.Length);
        payload.CopyTo(frame, FrameCodec.HeaderLength);
        await transport.WriteAsync(frame, ct);
        await transport.FlushAsync(ct);
    }

    /// <summary>
    /// Reads exactly the route frame from the raw connection (nothing after it, which belongs to
    /// TLS). Throws <see cref="PeerProtocolException"/> when the first frame is not a route.
    /// </summary>
    public static async Task<RouteRequest> ReadAsync(Stream transport, CancellationToken ct)
    {
        var header = new byte[FrameCodec.HeaderLength];
        try
        {
            await transport.ReadExactlyAsync(header, ct);
            var h = FrameCodec.ParseHeader(header, 0);
            if (h.Type != FrameType.Route)
                throw new PeerProtocolException($"first frame is {h.Type}, not a route (is the sender using TLS?)");
            if (h.Codec != FrameCodecKind.None || h.WireLength > MaxLength)
                throw new PeerProtocolException($"route frame header at byte 0 is malformed (codec {h.Codec}, length {h.WireLength})");
            var payload = new byte[h.WireLength];
            await transport.ReadExactlyAsync(payload, ct);
            return Decode(payload);
        }
        catch (EndOfStreamException e)
        {
            throw new PeerProtocolException("connection closed inside the route frame", e);
        }
    }

}
