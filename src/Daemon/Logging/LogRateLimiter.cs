namespace BFMig.Daemon.Logging;

/// <summary>
/// Lets through at most <c>burst</c> log lines of one kind per <c>window</c> and counts the rest,
/// so that a flood of hostile connections costs the journal a few lines, not one per attempt.
/// The count of what was held back is handed to the next line let through (and so appears in
/// the log as soon as the flood pauses for a window or the next window opens).
/// </summary>
public sealed class LogRateLimiter(int burst, TimeSpan window, TimeProvider time)
{
    private readonly Lock _gate = new();
    private DateTimeOffset _windowStart = DateTimeOffset.MinValue;
    private int _inWindow;
    private long _suppressed;

    /// <summary>Lines let through per window.</summary>
    public int Burst => burst;

    /// <summary>The window length.</summary>
    public TimeSpan Window => window;

    /// <summary>
    /// True when this line may be written; <paramref name="suppressedBefore"/> is how many were
    /// held back since the last one written (write that count first, when it is not 0).
    /// </summary>
    public bool TryAcquire(out long suppressedBefore)
    {
        lock (_gate)
        {
            var now = time.GetUtcNow();
            if (now - _windowStart >= window)
            {
                _windowStart = now;
                _inWindow = 0;
            }
            if (_inWindow >= burst)
            {
                _suppressed++;
                suppressedBefore = 0;
                return false;
            }
            _inWindow++;
            suppressedBefore = _suppressed;
            _suppressed = 0;
            return true;
        }
    }
}
