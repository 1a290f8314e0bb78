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
            // A bfmigd that refuses the frame (before protocol 9) or the connection (its pending
            // limits) closes with the frame unread, which the kernel sends as a reset.
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
            return $"{who} closed the version probe unanswered: a bfmigd before protocol 9, or one refusing connections (its log says which)";
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
/// One probe answer per peer for a short while, shared by every stream that asks meanwhile: a
/// memory stream and its multifd channels open within moments of each other and must get the
/// same answer (a channel carried straight to QEMU 7.2 while its main stream went through a
/// helper would be taken for the main stream there), and a migration's burst of streams opens
/// one probe on the peer's port, not one each. A "same version" answer is reused for
/// <c>reuse</c> from when it came, a "no" for <c>reuseNegative</c>; a probe in flight is joined.
/// </summary>
public sealed class PeerProbeAnswers(Func<PeerOptions, Task<string?>> ask, TimeSpan reuse, TimeSpan reuseNegative, TimeProvider time)
{
    private readonly Lock _gate = new();
    private readonly Dictionary<string, Asked> _answers = [];

    private sealed class Asked(Task<string?> answer)
    {
        public Task<string?> Answer { get; } = answer;

        // When the answer came (0 while in flight).
        public long AnsweredAt { get; set; }
    }

    /// <summary>The shared answer for <paramref name="peer"/>: a probe in flight or a recent answer, else a new one.</summary>
    public Task<string?> WhyNotAsync(PeerOptions peer)
    {
        Asked asked;
        lock (_gate)
        {
            if (_answers.TryGetValue(peer.Name, out var known) && Reusable(known))
                return known.Answer;
            asked = new Asked(ask(peer));
            _answers[peer.Name] = asked;
        }
        return StampAsync(asked);
    }

    private async Task<string?> StampAsync(Asked asked)
    {
        try
        {
            return await asked.Answer.ConfigureAwait(false);
        }
        finally
        {
            lock (_gate)
            {
                if (asked.AnsweredAt == 0)
                    asked.AnsweredAt = time.GetTimestamp();
            }
        }
    }

    // Under _gate. A probe that failed in a way of ours (an exception) is asked again; one that
    // has just completed, before StampAsync stamped it, counts as answered now.
    private bool Reusable(Asked known)
    {
        if (!known.Answer.IsCompleted)
            return true;
        if (!known.Answer.IsCompletedSuccessfully)
            return false;
        if (known.AnsweredAt == 0)
            known.AnsweredAt = time.GetTimestamp();
        return time.GetElapsedTime(known.AnsweredAt) < (known.Answer.Result is null ? reuse : reuseNegative);
    }
}
