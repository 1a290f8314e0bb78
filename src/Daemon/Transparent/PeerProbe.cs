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
            return ct.IsCancellationRequested ? Stopping : $"{who} does not answer";
        }
        byte[]? answer = null;
        try
        {
            await probe.SendAsync(VersionProbe.Encode(FrameCodec.ProtocolVersion), SocketFlags.None, deadline.Token).ConfigureAwait(false);
            answer = await VersionProbe.ReadFrameAsync(probe, deadline.Token).ConfigureAwait(false);
        }
        catch (SocketException e) when (e.SocketErrorCode == SocketError.ConnectionReset)
        {
            // A bfmigd that refuses the frame closes with it unread, which the kernel sends as a reset.
        }
        catch (OperationCanceledException)
        {
            return ct.IsCancellationRequested ? Stopping : $"{who} did not answer the version probe within {timeout.TotalSeconds:0.#} s";
        }
        catch (SocketException e)
        {
            return $"{who} failed the version probe: {e.Message}";
        }
        catch (PeerProtocolException e)
        {
            return $"{who} answered the version probe wrongly: {e.Message}";
        }
        if (answer is null)
            return $"{who} closed the version probe unanswered: a bfmigd before protocol 9";
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

    private const string Stopping = "bfmigd is stopping";
}

/// <summary>
/// One probe answer per peer for a short while, shared by every stream that asks meanwhile: the
/// streams of one migration (memory, disks, multifd channels) open within moments of each other
/// and must all get the same decision. A multifd channel carried straight to a QEMU 7.2 while its
/// main stream went through a helper would be taken for the main stream there. It also keeps a
/// migration's burst of streams from opening a burst of probes on the peer's port.
/// </summary>
public sealed class PeerProbeAnswers(Func<PeerOptions, Task<string?>> ask, TimeSpan reuse, TimeProvider time)
{
    private readonly Lock _gate = new();
    private readonly Dictionary<string, (long At, Task<string?> Answer)> _answers = [];

    /// <summary>The shared answer for <paramref name="peer"/>: a probe in flight or one answered within the reuse time, else a new one.</summary>
    public Task<string?> WhyNotAsync(PeerOptions peer)
    {
        lock (_gate)
        {
            long now = time.GetTimestamp();
            // A probe still in flight is joined; a finished one is reused for a while, unless it
            // failed in a way of ours (an exception): that is asked again.
            if (_answers.TryGetValue(peer.Name, out var known)
                && (!known.Answer.IsCompleted || (known.Answer.IsCompletedSuccessfully && time.GetElapsedTime(known.At, now) < reuse)))
                return known.Answer;
            var answer = ask(peer);
            _answers[peer.Name] = (now, answer);
            return answer;
        }
    }
}
