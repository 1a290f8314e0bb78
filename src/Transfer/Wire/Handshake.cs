using System.Security.Cryptography;

namespace BFMig.Transfer.Wire;

/// <summary>What the receiver decides after reading a hello.</summary>
/// <param name="Status">Match, mismatch or refused.</param>
/// <param name="HasStore">Whether the receiver will keep a store for this trip.</param>
/// <param name="Generation">The receiver's generation.</param>
/// <param name="Digest">The receiver's digest (16 bytes).</param>
/// <param name="Message">Why, for a refusal.</param>
public sealed record HelloDecision(HelloStatus Status, bool HasStore, ulong Generation, byte[] Digest, string Message)
{
    /// <summary>The receiver's memory pages in doubt, answered with a match.</summary>
    public BFMig.Transfer.Memory.MemoryDoubt Doubt { get; init; } = BFMig.Transfer.Memory.MemoryDoubt.None;

    /// <summary>A mismatch answered with the offer of the receiver's page index (<see cref="BFMig.Transfer.Memory.PeerPageIndex"/>).</summary>
    public bool IndexFollows { get; init; }
}

/// <summary>
/// The hello exchange with authentication, for both roles. With an authenticator that derives
/// frame keys (pre-shared key), every frame after the sender's Auth frame is sealed, both ways.
/// </summary>
public static class Handshake
{
    private static ReadOnlySpan<byte> ReceiverRole => "bfmig receiver"u8;
    private static ReadOnlySpan<byte> SenderRole => "bfmig sender"u8;

    /// <summary>
    /// Sender side: sends <paramref name="hello"/>, checks the receiver's proof, sends its own.
    /// Returns the receiver's reply; throws <see cref="PeerAuthenticationException"/> on a bad
    /// proof and <see cref="PeerProtocolException"/> on a refusal or malformed reply.
    /// </summary>
    public static async Task<HelloReply> ClientAsync(FrameReader reader, FrameWriter writer, IPeerAuthenticator auth, Hello hello, CancellationToken ct)
    {
        var helloBytes = hello.Encode();
        await writer.WriteAsync(FrameType.Hello, helloBytes, compress: false, ct);
        await writer.FlushAsync(ct);
        var frame = await reader.ReadHandshakeAsync(ct) ?? throw new PeerProtocolException("peer closed the connection before answering the hello");
        if (frame.Type == FrameType.Abort) throw new PeerAbortedException(AbortReason(frame.Payload.Span));
        if (frame.Type != FrameType.HelloReply) throw new PeerProtocolException($"expected a hello reply, got a {frame.Type} frame");
        var (reply, unsignedLength, proof) = HelloReply.Decode(frame.Payload.Span);
        var transcript = Concat(helloBytes, frame.Payload.Span[..unsignedLength]);
        Verify(auth, ReceiverRole, transcript, proof, "receiver");
        if (reply.Status == HelloStatus.Refused) throw new PeerProtocolException($"peer refused the stream: {reply.Message}");
        var mine = new byte[auth.ProofLength + 1];
        mine[0] = (byte)auth.ProofLength;
        auth.ComputeProof(SenderRole, transcript, mine.AsSpan(1));
        await writer.WriteAsync(FrameType.Auth, mine, compress: false, ct);
        if (auth.DeriveFrameKeys(transcript) is { } keys)
        {
            writer.Protect(new FrameSealer(keys.SenderToReceiver));
            reader.Protect(new FrameSealer(keys.ReceiverToSender));
        }
        return reply;
    }

    /// <summary>
    /// Receiver side: reads the hello, lets <paramref name="decide"/> answer it, proves itself and
    /// checks the sender's proof. Returns the hello and the decision.
    /// </summary>
    public static async Task<(Hello Hello, HelloDecision Decision)> ServerAsync(FrameReader reader, FrameWriter writer, IPeerAuthenticator auth,
        Func<Hello, HelloDecision> decide, CancellationToken ct)
    {
        var frame = await reader.ReadHandshakeAsync(ct) ?? throw new PeerProtocolException("peer closed the connection before its hello");
        if (frame.Type != FrameType.Hello) throw new PeerProtocolException($"expected a hello, got a {frame.Type} frame");
        var helloBytes = frame.Payload.ToArray();
        var hello = Hello.Decode(helloBytes);
        var decision = decide(hello);
        var reply = new HelloReply(decision.Status, decision.HasStore, decision.Generation, decision.Digest, RandomNumberGenerator.GetBytes(32), decision.Message) { Doubt = decision.Doubt, IndexFollows = decision.IndexFollows };
        var unsigned = reply.EncodeUnsigned();
        var transcript = Concat(helloBytes, unsigned);
        var payload = new byte[unsigned.Length + 1 + auth.ProofLength];
        unsigned.CopyTo(payload, 0);
        payload[unsigned.Length] = (byte)auth.ProofLength;
        auth.ComputeProof(ReceiverRole, transcript, payload.AsSpan(unsigned.Length + 1));
        await writer.WriteAsync(FrameType.HelloReply, payload, compress: false, ct);
        await writer.FlushAsync(ct);
        if (decision.Status == HelloStatus.Refused) return (hello, decision);
        var auth2 = await reader.ReadHandshakeAsync(ct) ?? throw new PeerProtocolException("peer closed the connection before its authentication");
        if (auth2.Type == FrameType.Abort) throw new PeerAbortedException(AbortReason(auth2.Payload.Span));
        if (auth2.Type != FrameType.Auth) throw new PeerProtocolException($"expected an auth frame, got a {auth2.Type} frame");
        var p = auth2.Payload.Span;
        if (p.Length < 1 || p[0] != p.Length - 1) throw new PeerProtocolException($"auth frame of {p.Length} bytes is malformed");
        Verify(auth, SenderRole, transcript, p[1..].ToArray(), "sender");
        if (auth.DeriveFrameKeys(transcript) is { } keys)
        {
            reader.Protect(new FrameSealer(keys.SenderToReceiver));
            writer.Protect(new FrameSealer(keys.ReceiverToSender));
        }
        return (hello, decision);
    }

    private static void Verify(IPeerAuthenticator auth, ReadOnlySpan<byte> role, byte[] transcript, byte[] proof, string who)
    {
        if (proof.Length != auth.ProofLength)
            throw new PeerAuthenticationException($"{who} proof of {proof.Length} bytes, expected {auth.ProofLength} (different authentication setup?)");
        if (proof.Length == 0) return;
        Span<byte> expected = stackalloc byte[auth.ProofLength];
        auth.ComputeProof(role, transcript, expected);
        if (!CryptographicOperations.FixedTimeEquals(expected, proof))
            throw new PeerAuthenticationException($"{who} failed authentication (wrong pre-shared key?)");
    }

    private static byte[] Concat(ReadOnlySpan<byte> a, ReadOnlySpan<byte> b)
    {
        var r = new byte[a.Length + b.Length];
        a.CopyTo(r);
        b.CopyTo(r.AsSpan(a.Length));
        return r;
    }

    /// <summary>Encodes an abort reason (UTF-8, at most 1024 bytes).</summary>
    public static byte[] EncodeAbort(string reason)
    {
        var b = System.Text.Encoding.UTF8.GetBytes(reason);
        return b.Length > 1024 ? b[..1024] : b;
    }

    /// <summary>Decodes an abort reason, escaped: the peer chose it, and it ends up in logs and error messages.</summary>
    public static string AbortReason(ReadOnlySpan<byte> payload) =>
        BFMig.Native.Systemd.LogText.Escape(System.Text.Encoding.UTF8.GetString(payload.Length > 1024 ? payload[..1024] : payload));
}
