using System.Diagnostics;
using BFMig.Transfer.Wire;

namespace BFMig.Transfer;

/// <summary>
/// Keeps the sender of a memory stream at most a window of load ahead of what the receiving QEMU
/// has taken (the receiver reports it in Progress frames). Load is stream bytes, with each zero
/// page of a main stream counted as a whole page (<see cref="Wire.ProgressMessage.Load"/>):
/// counted in bytes, a window of 6 MB held the 256 MiB of zero pages at the end of a guest's
/// memory, which the destination QEMU then took 350 ms to load while the guest was paused
/// (return trips with no rate limit). Positions and windows below are load.
/// <para>
/// Elision makes the wire cheap: without pacing the sender reads the source's memory many times
/// faster than the destination can rebuild and load it, only the wire bytes are held back by the
/// socket buffers. The source QEMU measures that speed, pauses the guest expecting a short
/// switchover, and the destination then loads the whole backlog while the guest stands still.
/// Paced, the source QEMU sees the rate at which the destination really loads, and the backlog
/// left when the guest pauses drains in about <see cref="Target"/>.
/// </para>
/// <para>
/// Window = highest recent delivery rate x (smallest seen round trip + <see cref="Target"/>),
/// between <see cref="MinWindow"/> and <see cref="MaxWindow"/>: enough in flight to cover the
/// round trip, no more backlog than drains in <see cref="Target"/>. Thread-safe: the sender's
/// forward loop calls <see cref="Sent"/> and <see cref="WaitForRoomAsync"/>, its inbox
/// <see cref="OnProgress"/>.
/// </para>
/// </summary>
public sealed class StreamPacer
{
    /// <summary>Smallest window; above the receiver's report step plus the sender's input buffer, so pacing cannot stall a stream.</summary>
    public const long MinWindow = 2L << 20;

    /// <summary>Largest window.</summary>
    public const long MaxWindow = 256L << 20;

    /// <summary>How long the backlog at the receiver may take to drain.</summary>
    public static readonly TimeSpan Target = TimeSpan.FromMilliseconds(30);

    private const int RateSamples = 8;
    private const int MaxMarks = 4096;
    private static readonly long RateInterval = Stopwatch.Frequency / 20;

    private readonly TimeSpan _stallTimeout;
    private readonly Lock _gate = new();
    private readonly Queue<(long Offset, long At)> _marks = new();
    private readonly double[] _rates = new double[RateSamples];
    private int _nextRate;
    private long _rateSince = Stopwatch.GetTimestamp();
    private long _rateSinceDelivered;
    private long _delivered;
    private long _lastMark = -1;
    private long _minRoundTrip = long.MaxValue;
    private long _window = MinWindow;
    private TaskCompletionSource? _waiter;

    /// <param name="stallTimeout">How long the receiver may report no progress while the sender waits.</param>
    public StreamPacer(TimeSpan stallTimeout) => _stallTimeout = stallTimeout;

    /// <summary>What the receiving QEMU has taken, as last reported.</summary>
    public long Delivered
    {
        get
        {
            lock (_gate)
                return _delivered;
        }
    }

    /// <summary>The current window.</summary>
    public long Window
    {
        get
        {
            lock (_gate)
                return _window;
        }
    }

    /// <summary>Times the sender waited for room, and for how long in total (statistics).</summary>
    public int Waits { get; private set; }

    /// <inheritdoc cref="Waits"/>
    public TimeSpan Waited { get; private set; }

    /// <summary>Everything up to <paramref name="offset"/> (load) has been handed to the peer.</summary>
    public void Sent(long offset)
    {
        lock (_gate)
        {
            if (_marks.Count >= MaxMarks || offset <= _lastMark) return;
            _marks.Enqueue((offset, Stopwatch.GetTimestamp()));
            _lastMark = offset;
        }
    }

    /// <summary>The receiver reports <paramref name="delivered"/> taken by its QEMU.</summary>
    /// <exception cref="Wire.PeerProtocolException">the report goes backwards.</exception>
    public void OnProgress(long delivered)
    {
        TaskCompletionSource? wake;
        lock (_gate)
        {
            if (delivered < _delivered)
                throw new Wire.PeerProtocolException($"progress went back from {_delivered} to {delivered}");
            long now = Stopwatch.GetTimestamp();
            long sentAt = -1;
            while (_marks.Count > 0 && _marks.Peek().Offset <= delivered)
                sentAt = _marks.Dequeue().At;
            if (sentAt >= 0) _minRoundTrip = Math.Min(_minRoundTrip, now - sentAt);
            _delivered = delivered;
            if (now - _rateSince >= RateInterval)
            {
                _rates[_nextRate++ % RateSamples] = (delivered - _rateSinceDelivered) * (double)Stopwatch.Frequency / (now - _rateSince);
                _rateSince = now;
                _rateSinceDelivered = delivered;
                _window = ComputeWindow();
            }
            wake = _waiter;
            _waiter = null;
        }
        wake?.TrySetResult();
    }

    private long ComputeWindow()
    {
        double rate = _rates.Max();
        double seconds = (_minRoundTrip == long.MaxValue ? 0 : (double)_minRoundTrip / Stopwatch.Frequency) + Target.TotalSeconds;
        return (long)Math.Clamp(rate * seconds, MinWindow, MaxWindow);
    }

    /// <summary>True when a sender at <paramref name="offset"/> (load) must wait before reading more.</summary>
    public bool MustWait(long offset)
    {
        lock (_gate)
            return offset - _delivered > _window;
    }

    /// <summary>
    /// Waits until the sender at <paramref name="offset"/> is within the window again. Everything
    /// up to <paramref name="offset"/> must already be on its way to the peer.
    /// </summary>
    /// <returns>How long it waited.</returns>
    /// <exception cref="TimeoutException">the receiver reported no progress for the stall timeout.</exception>
    public async Task<TimeSpan> WaitForRoomAsync(long offset, CancellationToken ct)
    {
        if (!MustWait(offset)) return TimeSpan.Zero;
        long start = Stopwatch.GetTimestamp();
        try
        {
            while (true)
            {
                Task progress;
                long before;
                lock (_gate)
                {
                    if (offset - _delivered <= _window) return Stopwatch.GetElapsedTime(start);
                    _waiter ??= new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
                    progress = _waiter.Task;
                    before = _delivered;
                }
                try
                {
                    await progress.WaitAsync(_stallTimeout, ct);
                }
                catch (TimeoutException)
                {
                    throw new TimeoutException(
                        $"the receiver reported no progress for {_stallTimeout.TotalSeconds:0} s (its QEMU took {before}, this side is at {offset})");
                }
            }
        }
        finally
        {
            Waits++;
            Waited += Stopwatch.GetElapsedTime(start);
        }
    }
}
