namespace BFMig.Daemon.Api;

/// <summary>
/// At most <c>limit</c> calls per <c>window</c> for each caller uid (a sliding window of the
/// accepted calls' times). A caller cannot escape it by reconnecting: the bus gives a new unique
/// name, not a new uid. Callers are forgotten once their window is empty, so the table stays as
/// small as the set of users who called in the last window.
/// </summary>
public sealed class CallRateLimit(int limit, TimeSpan window, TimeProvider time)
{
    private readonly Lock _gate = new();
    private readonly Dictionary<uint, Queue<DateTimeOffset>> _calls = [];

    /// <summary>Calls allowed per window.</summary>
    public int Limit => limit;

    /// <summary>The window length.</summary>
    public TimeSpan Window => window;

    /// <summary>
    /// Counts a call of <paramref name="uid"/> and returns true, or returns false when the uid used
    /// up its calls; <paramref name="retryAfter"/> then says when the oldest of them leaves the window.
    /// </summary>
    public bool TryTake(uint uid, out TimeSpan retryAfter)
    {
        lock (_gate)
        {
            var now = time.GetUtcNow();
            foreach (var key in _calls.Keys.ToList())
            {
                var q = _calls[key];
                while (q.Count > 0 && now - q.Peek() >= window)
                    q.Dequeue();
                if (q.Count == 0)
                    _calls.Remove(key);
            }
            if (!_calls.TryGetValue(uid, out var calls))
                _calls[uid] = calls = new Queue<DateTimeOffset>(limit);
            if (calls.Count >= limit)
            {
                retryAfter = calls.Peek() + window - now;
                return false;
            }
            calls.Enqueue(now);
            retryAfter = TimeSpan.Zero;
            return true;
        }
    }
}
