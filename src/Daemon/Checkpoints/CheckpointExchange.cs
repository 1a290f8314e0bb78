using System.Net.Sockets;
using System.Security.Cryptography;
using System.Text.Json;
using System.Text.Json.Serialization;
using BFMig.Transfer.Wire;

namespace BFMig.Daemon.Checkpoints;

/// <summary>
/// What the source daemon sends before a trip: the guest's checkpoint XMLs as libvirt gave them
/// (any order; the receiver orders them), and when they were read.
/// </summary>
public sealed record CheckpointSnapshot(string Guest, string Source, long TakenAtUnixSeconds, IReadOnlyList<string> Checkpoints);

[JsonSourceGenerationOptions(PropertyNamingPolicy = JsonKnownNamingPolicy.CamelCase)]
[JsonSerializable(typeof(CheckpointSnapshot))]
internal sealed partial class CheckpointJsonContext : JsonSerializerContext;

/// <summary>
/// The daemon-to-daemon control exchange that carries checkpoint metadata, on the peers' data
/// port. It reuses the helpers' handshake (hello with kind <see cref="StreamKind.Control"/>;
/// mutual proof with the pre-shared key, or mutual TLS after a route frame in clear, as the
/// helpers do), then the sender writes the JSON document as Tunnel
/// frames followed by TunnelEof, and the receiver answers EndAck (committed = stored) or Abort
/// with the reason.
/// </summary>
public static class CheckpointExchange
{
    /// <summary>Largest document accepted (all checkpoint XMLs of one guest).</summary>
    public const int MaxDocumentBytes = 32 << 20;

    private static readonly byte[] NoDigest = new byte[16];

    /// <summary>Encodes a snapshot as the JSON document that travels.</summary>
    public static byte[] Encode(CheckpointSnapshot snapshot) =>
        JsonSerializer.SerializeToUtf8Bytes(snapshot, CheckpointJsonContext.Default.CheckpointSnapshot);

    /// <summary>Decodes a document; throws <see cref="CheckpointSetException"/> naming what is wrong.</summary>
    public static CheckpointSnapshot Decode(ReadOnlySpan<byte> document)
    {
        if (document.Length > MaxDocumentBytes)
            throw new CheckpointSetException($"checkpoint document of {document.Length} bytes exceeds {MaxDocumentBytes}");
        CheckpointSnapshot? snapshot;
        try
        {
            snapshot = JsonSerializer.Deserialize(document, CheckpointJsonContext.Default.CheckpointSnapshot);
        }
        catch (JsonException e)
        {
            throw new CheckpointSetException($"checkpoint document is not valid JSON at byte {e.BytePositionInLine} of line {e.LineNumber}: {e.Message}");
        }
        if (snapshot is null || snapshot.Guest is null || snapshot.Source is null || snapshot.Checkpoints is null)
            throw new CheckpointSetException("checkpoint document lacks guest, source or checkpoints");
        if (snapshot.Checkpoints.Count > CheckpointOrder.MaxCheckpoints)
            throw new CheckpointSetException($"checkpoint document lists {snapshot.Checkpoints.Count} checkpoints (max {CheckpointOrder.MaxCheckpoints})");
        return snapshot;
    }

    /// <summary>Sends <paramref name="snapshot"/> to the peer daemon at host:port and waits for it to be stored.</summary>
    public static async Task SendAsync(string host, int port, IPeerAuthenticator auth, string senderName, Guid guest,
        CheckpointSnapshot snapshot, TimeSpan timeout, CancellationToken ct)
    {
        using var cts = CancellationTokenSource.CreateLinkedTokenSource(ct);
        cts.CancelAfter(timeout);
        using var client = new TcpClient { NoDelay = true };
        await client.ConnectAsync(host, port, cts.Token).ConfigureAwait(false);
        // With TLS the hello travels encrypted: the route in clear tells the peer's daemon what this connection is.
        if (auth.HidesHello)
            await new RouteRequest(StreamKind.Control, guest, senderName).WriteAsync(client.GetStream(), cts.Token).ConfigureAwait(false);
        await using var stream = await auth.SecureAsync(client.GetStream(), isInitiator: true, host, cts.Token).ConfigureAwait(false);
        using var reader = new FrameReader(stream, timeout);
        using var writer = new FrameWriter(stream, CompressionMode.Zstd);
        var hello = new Hello(StreamKind.Control, WantsStore: false, guest, 0, NoDigest, 0, RandomNumberGenerator.GetBytes(32), senderName);
        await Handshake.ClientAsync(reader, writer, auth, hello, cts.Token).ConfigureAwait(false);
        var document = Encode(snapshot);
        for (int offset = 0; offset < document.Length; offset += FrameCodec.MaxPayload)
        {
            var piece = document.AsMemory(offset, Math.Min(FrameCodec.MaxPayload, document.Length - offset));
            await writer.WriteAsync(FrameType.Tunnel, piece, compress: true, cts.Token).ConfigureAwait(false);
        }
        await writer.WriteAsync(FrameType.TunnelEof, ReadOnlyMemory<byte>.Empty, compress: false, cts.Token).ConfigureAwait(false);
        await writer.FlushAsync(cts.Token).ConfigureAwait(false);
        var answer = await reader.ReadAsync(cts.Token).ConfigureAwait(false)
            ?? throw new PeerProtocolException("peer closed the control connection before confirming the checkpoints");
        switch (answer.Type)
        {
            case FrameType.Abort:
                throw new PeerAbortedException(Handshake.AbortReason(answer.Payload.Span));
            case FrameType.EndAck when EndAck.Decode(answer.Payload.Span).Committed:
                return;
            default:
                throw new PeerProtocolException($"expected the peer's confirmation of the checkpoints, got a {answer.Type} frame");
        }
    }

    /// <summary>
    /// Receiver side, on a connection whose hello or route (kind Control) the listener peeked at:
    /// with TLS (<see cref="IPeerAuthenticator.HidesHello"/>) reads the route and secures the
    /// connection first, then runs the handshake (the hello inside must name the route's guest and
    /// sender), reads the document and hands it to <paramref name="store"/>, which returns null
    /// when stored or the reason it refused. Returns the snapshot that was stored.
    /// </summary>
    public static async Task<CheckpointSnapshot?> ServeAsync(Stream transport, IPeerAuthenticator auth, Func<Hello, CheckpointSnapshot, string?> store,
        TimeSpan timeout, CancellationToken ct)
    {
        using var cts = CancellationTokenSource.CreateLinkedTokenSource(ct);
        cts.CancelAfter(timeout);
        RouteRequest? route = null;
        if (auth.HidesHello)
        {
            route = await RouteRequest.ReadAsync(transport, cts.Token).ConfigureAwait(false);
            if (route.Kind != StreamKind.Control)
                throw new PeerProtocolException($"{route.Kind} route sent to the control exchange");
        }
        await using var stream = await auth.SecureAsync(transport, isInitiator: false, route?.SenderName ?? "", cts.Token).ConfigureAwait(false);
        using var reader = new FrameReader(stream, timeout);
        using var writer = new FrameWriter(stream, CompressionMode.None);
        var (hello, decision) = await Handshake.ServerAsync(reader, writer, auth,
            h => h.Kind != StreamKind.Control
                ? new HelloDecision(HelloStatus.Refused, false, 0, NoDigest, $"{h.Kind} stream sent to the control exchange")
                : route is not null && (h.Guest != route.Guest || h.SenderName != route.SenderName)
                    ? new HelloDecision(HelloStatus.Refused, false, 0, NoDigest,
                        $"the hello names guest {h.Guest:D} from '{h.SenderName}', the route guest {route.Guest:D} from '{route.SenderName}'")
                    : new HelloDecision(HelloStatus.Match, false, 0, NoDigest, ""),
            cts.Token).ConfigureAwait(false);
        if (decision.Status == HelloStatus.Refused)
            return null;
        using var document = new MemoryStream();
        while (true)
        {
            var frame = await reader.ReadAsync(cts.Token).ConfigureAwait(false)
                ?? throw new PeerProtocolException($"peer closed the control connection after {document.Length} bytes of checkpoints");
            if (frame.Type == FrameType.TunnelEof)
                break;
            if (frame.Type == FrameType.Abort)
                throw new PeerAbortedException(Handshake.AbortReason(frame.Payload.Span));
            if (frame.Type != FrameType.Tunnel)
                throw new PeerProtocolException($"unexpected {frame.Type} frame in the checkpoint document at byte {document.Length}");
            if (document.Length + frame.Payload.Length > MaxDocumentBytes)
                throw new PeerProtocolException($"checkpoint document exceeds {MaxDocumentBytes} bytes");
            document.Write(frame.Payload.Span);
        }
        string? refusal;
        CheckpointSnapshot? snapshot = null;
        try
        {
            snapshot = Decode(document.GetBuffer().AsSpan(0, (int)document.Length));
            refusal = snapshot.Guest != hello.Guest.ToString("D")
                ? $"document names guest {snapshot.Guest}, the hello {hello.Guest:D}"
                : store(hello, snapshot);
        }
        catch (CheckpointSetException e)
        {
            refusal = e.Message;
        }
        if (refusal is null)
            await writer.WriteAsync(FrameType.EndAck, new EndAck(true, NoDigest).Encode(), compress: false, cts.Token).ConfigureAwait(false);
        else
            await writer.WriteAsync(FrameType.Abort, Handshake.EncodeAbort(refusal), compress: false, cts.Token).ConfigureAwait(false);
        await writer.FlushAsync(cts.Token).ConfigureAwait(false);
        return refusal is null ? snapshot : throw new CheckpointSetException(refusal);
    }
}
