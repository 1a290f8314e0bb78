using System.Buffers.Binary;
using System.Net.Sockets;
using System.Text;
using BFMig.Daemon.Transfers;
using BFMig.Transfer.Memory;
using BFMig.Transfer.Wire;

namespace BFMig.Fuzz;

/// <summary>
/// The first bytes a peer sends: the hello, the hello reply and the route decoders, and the two
/// readers of a connection's first frame, the helper's (<see cref="RouteRequest.ReadAsync"/>) and
/// the daemon's (<see cref="PeerListener.PeekRouteAsync"/>, over a real Unix socket), and the
/// memory pages in doubt that the reply and a memory stream's first frame carry. Allowed
/// failure: <see cref="PeerProtocolException"/>. Whatever decodes re-encodes to the same bytes
/// (when the name is valid UTF-8; invalid sequences decode to U+FFFD by design).
/// </summary>
internal static class HelloTarget
{
    private const int MaxFirstFrame = FrameCodec.HeaderLength + 89 + 255;

    private static readonly UTF8Encoding StrictUtf8 = new(encoderShouldEmitUTF8Identifier: false, throwOnInvalidBytes: true);

    private static Socket? _listener;
    private static string _socketPath = "";

    public static List<byte[]> Corpus()
    {
        var guest = Guid.Parse("6f1e2a7c-1b44-4c8e-9d2f-5a0b3c4d5e6f");
        var digest = Enumerable.Range(1, 16).Select(i => (byte)i).ToArray();
        var nonce = Enumerable.Range(100, 32).Select(i => (byte)i).ToArray();
        var hellos = new[]
        {
            new Hello(StreamKind.Mig, true, guest, 3, digest, 0x1234_5678_9abc_def0, nonce, "hosta").Encode(),
            new Hello(StreamKind.Nbd, false, guest, 0, new byte[16], 0, nonce, "host-b.lab") { Paced = true }.Encode(),
            new Hello(StreamKind.Control, false, guest, 7, digest, 1, nonce, "").Encode(),
            new Hello(StreamKind.Mig, true, guest, 2, digest, 5, nonce, "older") { Version = FrameCodec.OldestPeerVersion }.Encode(),
            new Hello(StreamKind.Mig, false, guest, 0, new byte[16], 0, nonce, "hosta") { QuietChannel = true }.Encode(),
        };
        var routes = new[]
        {
            new RouteRequest(StreamKind.Mig, guest, "hosta").Encode(),
            new RouteRequest(StreamKind.Nbd, guest, "hosta") { TargetPort = 49153 }.Encode(),
            new RouteRequest(StreamKind.Mig, guest, "") { TargetPort = 49152 }.Encode(),
            new RouteRequest(StreamKind.Nbd, guest, "older") { Version = FrameCodec.OldestPeerVersion }.Encode(),
        };
        var reply = new HelloReply(HelloStatus.Match, true, 3, digest, nonce, "ok").EncodeUnsigned();
        byte[] signed = [.. reply, 32, .. Enumerable.Repeat((byte)0xab, 32)];
        var doubt = MemoryDoubt.Of([new PageRange(0, 5, 3), new PageRange(0, 100, 1), new PageRange(2, 0, 4096)]);
        var doubtful = new HelloReply(HelloStatus.Match, true, 3, digest, nonce, "") { Doubt = doubt }.EncodeUnsigned();
        byte[] signedDoubt = [.. doubtful, 32, .. Enumerable.Repeat((byte)0xcd, 32)];
        var list = new List<byte[]>();
        list.AddRange(hellos);
        list.AddRange(routes);
        list.Add(signed);
        list.Add(signedDoubt);
        list.Add(doubt.Encode());
        list.Add(MemoryDoubt.All.Encode());
        // As a connection starts: one frame, uncompressed (a hello in PSK mode, a route before TLS).
        list.AddRange(hellos.Select(h => Framed(FrameType.Hello, h)));
        list.AddRange(routes.Select(r => Framed(FrameType.Route, r)));
        // A peer bfmigd's version probe, this version's and a later one's longer payload.
        list.Add(VersionProbe.Encode(FrameCodec.ProtocolVersion));
        list.Add(Framed(FrameType.Probe, [.. "BFMP"u8, 0, 10, 1, 2, 3]));
        return list;
    }

    public static void Run(byte[] input, Random r)
    {
        var budget = Budget.Start(1 << 20, "hello");
        try
        {
            var hello = Hello.Decode(input);
            if (IsStrictUtf8(input.AsSpan(89)) && !hello.Encode().AsSpan().SequenceEqual(input))
                throw new InvalidOperationException("a decoded hello does not encode to its own bytes");
            RouteRequest.From(hello);
        }
        catch (PeerProtocolException)
        {
        }
        try
        {
            var (reply, unsignedLength, proof) = HelloReply.Decode(input);
            if (unsignedLength + 1 + proof.Length != input.Length)
                throw new InvalidOperationException("hello reply parts do not add up to its length");
            if (IsStrictUtf8(input.AsSpan(59, input[58])) && !reply.EncodeUnsigned().AsSpan().SequenceEqual(input.AsSpan(0, unsignedLength)))
                throw new InvalidOperationException("a decoded hello reply does not encode to its own bytes");
        }
        catch (PeerProtocolException)
        {
        }
        if (MemoryDoubt.Decode(input) is { } d)
        {
            if (d.Length > input.Length || d.Doubt.Ranges.Count > MemoryDoubt.MaxRanges)
                throw new InvalidOperationException("a decoded doubt claims more bytes or ranges than it may");
            if (MemoryDoubt.Decode(d.Doubt.Encode()) is not { } again || !again.Doubt.SameAs(d.Doubt))
                throw new InvalidOperationException("a decoded doubt does not survive its own encoding");
        }
        try
        {
            var route = RouteRequest.Decode(input);
            if (IsStrictUtf8(input.AsSpan(24, input[23])) && !route.Encode().AsSpan().SequenceEqual(input))
                throw new InvalidOperationException("a decoded route does not encode to its own bytes");
        }
        catch (PeerProtocolException)
        {
        }
        try
        {
            RouteRequest.ReadAsync(new MemoryStream(input, writable: false), CancellationToken.None).GetAwaiter().GetResult();
        }
        catch (PeerProtocolException)
        {
        }
        try
        {
            var version = VersionProbe.Decode(input);
            if (input.Length == VersionProbe.FrameLength && !VersionProbe.Encode(version).AsSpan().SequenceEqual(input))
                throw new InvalidOperationException("a decoded probe does not encode to its own bytes");
        }
        catch (PeerProtocolException)
        {
        }
        if (FirstFrameComplete(input))
            Peek(input);
        budget.Check();
    }

    private static bool IsStrictUtf8(ReadOnlySpan<byte> bytes)
    {
        try
        {
            StrictUtf8.GetCharCount(bytes);
            return true;
        }
        catch (DecoderFallbackException)
        {
            return false;
        }
    }

    /// <summary>One uncompressed frame as a peer writes it (also the page-index target's corpus).</summary>
    internal static byte[] Framed(FrameType type, byte[] payload)
    {
        var frame = new byte[FrameCodec.HeaderLength + payload.Length];
        FrameCodec.WriteHeader(frame, type, FrameCodecKind.None, payload.Length);
        payload.CopyTo(frame, FrameCodec.HeaderLength);
        return frame;
    }

    // The daemon peeks until the whole first frame is queued (a slow sender gets HelloTimeout):
    // only a frame that is all there, or a header it rejects, has an answer without waiting.
    private static bool FirstFrameComplete(byte[] input) =>
        input.Length >= FrameCodec.HeaderLength
        && BinaryPrimitives.ReadUInt32BigEndian(input.AsSpan(4)) is var length
        && (length > MaxFirstFrame - FrameCodec.HeaderLength || input.Length >= FrameCodec.HeaderLength + length || input[1] != 0);

    private static void Peek(byte[] input)
    {
        if (_listener is null)
        {
            _socketPath = Path.Combine(Directory.Exists("/dev/shm") ? "/dev/shm" : Path.GetTempPath(), $"bfmig-fuzz-hello-{Environment.ProcessId}.sock");
            File.Delete(_socketPath);
            _listener = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
            _listener.Bind(new UnixDomainSocketEndPoint(_socketPath));
            _listener.Listen(4);
        }
        using var sender = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        sender.Connect(new UnixDomainSocketEndPoint(_socketPath));
        using var receiver = _listener.Accept();
        sender.Send(input.AsSpan(0, Math.Min(input.Length, 4096)));
        sender.Shutdown(SocketShutdown.Send);
        try
        {
            var route = PeerListener.PeekRouteAsync(receiver, TimeSpan.FromSeconds(3), CancellationToken.None).GetAwaiter().GetResult();
            if (route is not null && route.SenderName.Length > 255 * 3)
                throw new InvalidOperationException("route name longer than its length byte allows");
        }
        catch (PeerProtocolException)
        {
        }
    }

    /// <summary>Removes the socket file (end of a mutation run).</summary>
    public static void Close()
    {
        _listener?.Dispose();
        if (_socketPath.Length > 0)
            File.Delete(_socketPath);
    }
}
