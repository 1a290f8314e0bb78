using System.Net.Sockets;
using BFMig.Daemon.Configuration;
using BFMig.Transfer.Wire;

namespace BFMig.Daemon.Transparent;

/// <summary>
/// Whether an intercepted stream may go to a helper: the peer's bfmigd must answer on its data
/// port and speak this host's protocol (<see cref="VersionProbe"/>). A peer without a running
/// bfmigd, or one upgraded or not yet upgraded (a rolling upgrade), would refuse the helper's
/// stream and fail the migration; asked first, the stream goes straight to the peer's QEMU, at
/// stock cost, and the reason is logged.
/// </summary>
public static class PeerProbe
{
    /// <summary>Null when the peer's bfmigd speaks this protocol, else why the stream is not accelerated.</summary>
    public static async Task<string?> WhyNotAsync(PeerOptions peer, TimeSpan timeout, CancellationToken ct)
    {
        using var probe = new Socket(SocketType.Stream, ProtocolType.Tcp);
        using var deadline = CancellationTokenSource.CreateLinkedTokenSource(ct);
        deadline.CancelAfter(timeout);
        var who = $"the bfmigd of peer {peer.Name} at {peer.Host}:{peer.Port}";
        try
        {
            await probe.ConnectAsync(peer.Host, peer.Port, deadline.Token).ConfigureAwait(false);
        }
        catch (Exception e) when (e is SocketException or OperationCanceledException)
        {
            return $"{who} does not answer";
        }
        var answer = new byte[VersionProbe.FrameLength];
        int read = 0;
        try
        {
            await probe.SendAsync(VersionProbe.Encode(FrameCodec.ProtocolVersion), SocketFlags.None, deadline.Token).ConfigureAwait(false);
            while (read < answer.Length)
            {
                int n = await probe.ReceiveAsync(answer.AsMemory(read), SocketFlags.None, deadline.Token).ConfigureAwait(false);
                if (n == 0)
                    break;
                read += n;
            }
        }
        catch (Exception e) when (e is SocketException or OperationCanceledException)
        {
            return ct.IsCancellationRequested ? "bfmigd is stopping" : $"{who} did not answer the version probe ({e.Message})";
        }
        if (read < answer.Length)
            return $"{who} closed the version probe after {read} of {answer.Length} bytes (a bfmigd older than the probe?)";
        ushort version;
        try
        {
            version = VersionProbe.Decode(answer);
        }
        catch (PeerProtocolException e)
        {
            return $"{who} answered the version probe wrongly: {e.Message}";
        }
        return version == FrameCodec.ProtocolVersion ? null : $"{who} speaks protocol {version}, this one {FrameCodec.ProtocolVersion}";
    }
}
