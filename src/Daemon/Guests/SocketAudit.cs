namespace BFMig.Daemon.Guests;

/// <summary>
/// The differences the periodic audit finds between the running guests and the guests with
/// sockets, each confirmed before anything is done about it. libvirt lists a guest as running
/// before it delivers its Started event (seconds, with preallocated memory) and stops listing one
/// before its Stopped event is handled, so a difference counts as a missed event only once it has
/// lasted <c>confirm</c>, seen by two audits or more. Each difference is judged on its own: guests
/// that come and go beside a stuck one do not reset it. Used by the watcher's pump thread only.
/// </summary>
internal sealed class SocketAudit(TimeSpan confirm)
{
    private readonly Dictionary<(Guid Uuid, string Name, bool Missing), long> _firstSeen = [];

    /// <summary>How long a difference must last.</summary>
    public TimeSpan Confirm => confirm;

    /// <summary>
    /// Compares at <paramref name="nowMs"/> (a monotonic clock). Missing: running without sockets;
    /// Stale: sockets without a running guest; both confirmed and then forgotten. Pending: some
    /// difference waits for its confirmation (the caller asks again soon).
    /// </summary>
    public (List<(Guid Uuid, string Name)> Missing, List<(Guid Uuid, string Name)> Stale, bool Pending) Compare(
        IEnumerable<(Guid Uuid, string Name)> running, IEnumerable<(Guid Uuid, string Name)> withSockets, long nowMs)
    {
        var expected = running.ToHashSet();
        var actual = withSockets.ToHashSet();
        var now = expected.Except(actual).Select(g => (g.Uuid, g.Name, Missing: true))
            .Concat(actual.Except(expected).Select(g => (g.Uuid, g.Name, Missing: false))).ToHashSet();
        foreach (var gone in _firstSeen.Keys.Where(k => !now.Contains(k)).ToList())
            _firstSeen.Remove(gone);
        var (missing, stale) = (new List<(Guid, string)>(), new List<(Guid, string)>());
        foreach (var difference in now)
        {
            if (!_firstSeen.TryGetValue(difference, out var since))
            {
                _firstSeen[difference] = nowMs;
                continue;
            }
            if (nowMs - since < confirm.TotalMilliseconds)
                continue;
            (difference.Missing ? missing : stale).Add((difference.Uuid, difference.Name));
            _firstSeen.Remove(difference);
        }
        return (missing, stale, _firstSeen.Count > 0);
    }

    /// <summary>Forgets every unconfirmed difference (after a reconnect's reconcile).</summary>
    public void Reset() => _firstSeen.Clear();
}
