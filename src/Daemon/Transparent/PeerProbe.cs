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
        var unanswered = $"{who} closed the version probe unanswered: a bfmigd before protocol 9, or one refusing connections (its log says which)";
        ushort version;
        try
        {
            await probe.SendAsync(VersionProbe.Encode(FrameCodec.ProtocolVersion), SocketFlags.None, deadline.Token).ConfigureAwait(false);
            if (await VersionProbe.ReadFrameAsync(probe, deadline.Token).ConfigureAwait(false) is not { } answer)
                return unanswered;
            version = VersionProbe.Decode(answer);
        }
        catch (SocketException e) when (e.SocketErrorCode == SocketError.ConnectionReset)
        {
            // A bfmigd that refuses the frame (before protocol 9) or the connection (its pending
            // limits) closes with the frame unread, which the kernel sends as a reset.
            return unanswered;
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
    // Each peer's latest probe: its answer and when that came.
    private readonly Dictionary<string, Task<(string? Why, long At)>> _answers = [];

    /// <summary>The shared answer for <paramref name="peer"/>: a probe in flight or a recent answer, else a new one.</summary>
    public async Task<string?> WhyNotAsync(PeerOptions peer)
    {
        Task<(string? Why, long At)>? answer;
        lock (_gate)
        {
            if (!_answers.TryGetValue(peer.Name, out answer) || !Reusable(answer))
                _answers[peer.Name] = answer = StampedAsync(ask(peer));
        }
        return (await answer.ConfigureAwait(false)).Why;
    }

    private async Task<(string? Why, long At)> StampedAsync(Task<string?> asked) => (await asked.ConfigureAwait(false), time.GetTimestamp());

    // A probe in flight is joined; one that failed in a way of ours (an exception) is asked again.
    private bool Reusable(Task<(string? Why, long At)> answer) =>
        !answer.IsCompleted
        || (answer.IsCompletedSuccessfully && time.GetElapsedTime(answer.Result.At) < (answer.Result.Why is null ? reuse : reuseNegative));
}
