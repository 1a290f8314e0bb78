using BFMig.Transfer.Memory;
using BFMig.Transfer.Wire;

namespace BFMig.Transfer;

/// <summary>
/// Keeps the sender of a memory stream at most a window ahead of what the receiving QEMU has taken
/// (the receiver reports it in Progress frames, as load: stream bytes with each zero page of a
/// main stream counted as a whole page, <see cref="Wire.ProgressMessage.Load"/>).
/// <para>
/// Elision makes the wire cheap: without pacing the sender reads the source's memory many times
/// faster than the destination can rebuild and load it, only the wire bytes are held back by the
/// socket buffers. The source QEMU measures that speed, pauses the guest expecting a short
/// switchover, and the destination then loads the whole backlog while the guest stands still.
/// Paced, the source QEMU sees the rate at which the destination really loads, and the backlog
/// left when the guest pauses drains in about <see cref="Target"/>.
/// </para>
/// <para>
/// What is in flight is timed in two kinds, each at the highest rate the destination recently took
/// it: stream bytes, and zero pages. Counted as bytes alone, a window of 6 MB held the 256 MiB of
/// zero pages at the end of a guest's memory, which the destination QEMU then took 350 ms to load
/// while the guest was paused (return trips with no rate limit); counted as load alone, the rate
/// measured over those zero pages (GB/s) opened the window for the pages after them, which crossed
/// a 100 Mbit/s link at a thousandth of it. The sender may read on while the backlog is estimated
/// to drain within the smallest seen round trip + <see cref="Target"/>, always while at most
/// <see cref="MinWindow"/> of load is in flight, never while more than <see cref="MaxWindow"/> is
/// (one read can add more). A zero page is never timed above a page of stream bytes. A sample
/// that mixes both kinds credits each with the whole interval, so mixed memory is paced more
/// tightly than it needs (conservative: costs throughput on long round trips, never downtime).
/// Thread-safe: the sender's forward loop calls <see cref="Sent"/> and <see cref="WaitForRoomAsync"/>,
/// its inbox <see cref="OnProgress"/>.
/// </para>
/// </summary>
public sealed class StreamPacer
{
    /// <summary>Load that may always be in flight; above the receiver's report step plus the sender's input buffer, so pacing cannot stall a stream.</summary>
    public const long MinWindow = 2L << 20;

    /// <summary>Load in flight beyond which the sender never reads.</summary>
    public const long MaxWindow = 256L << 20;

    /// <summary>How long the backlog at the receiver may take to drain.</summary>
    public static readonly TimeSpan Target = TimeSpan.FromMilliseconds(30);

    private const int RateSamples = 8;
    private const int MaxMarks = 4096;
    private readonly TimeProvider _time;
    private readonly long _rateInterval;

    // A point of the stream: where the sender was (Sent), or what the receiver took (interpolated).
    private readonly record struct Position(long Load, long ZeroPages)
    {
        public static Position Of(long streamBytes, long zeroPages) => new(Wire.ProgressMessage.Load(streamBytes, zeroPages), zeroPages);

        public long StreamBytes => Load - (ZeroPages << QemuFormat.PageShift);
    }

    private readonly TimeSpan _stallTimeout;
    private readonly Lock _gate = new();
    private readonly Queue<(Position At, long Time)> _marks = new();
    private readonly double[] _byteRates = new double[RateSamples];
    private readonly double[] _zeroRates = new double[RateSamples];
    private int _nextRate;
    private long _rateSince;
    private Position _rateSinceDelivered;
    private Position _passed;     // the last mark the receiver passed
    private Position _delivered;  // what the receiver took; its zero pages interpolated between marks
    private Position _latest;     // the furthest the sender has been, kept even when the marks are full
    private long _minRoundTrip = long.MaxValue;
    private double _byteRate;     // highest recent rates, 0 until measured
    private double _zeroRate;
    private TaskCompletionSource? _waiter;

    /// <param name="stallTimeout">How long the receiver may report no progress while the sender waits.</param>
    /// <param name="time">The clock the rates and round trips are measured by (tests pass their own); the system's by default.</param>
    public StreamPacer(TimeSpan stallTimeout, TimeProvider? time = null)
    {
        _stallTimeout = stallTimeout;
        _time = time ?? TimeProvider.System;
        _rateInterval = _time.TimestampFrequency / 20;
        _rateSince = _time.GetTimestamp();
    }

    /// <summary>What the receiving QEMU has taken (load), as last reported.</summary>
    public long Delivered
    {
        get
        {
            lock (_gate)
                return _delivered.Load;
        }
    }

    /// <summary>Stream bytes of a stream with no zero pages that may be in flight at the current byte rate (statistics and tests; <see cref="MustWait"/> decides).</summary>
    public long Window
    {
        get
        {
            lock (_gate)
                return (long)Math.Clamp(_byteRate * Budget(), MinWindow, MaxWindow);
        }
    }

    /// <summary>Times the sender waited for room, and for how long in total (statistics).</summary>
    public int Waits { get; private set; }

    /// <inheritdoc cref="Waits"/>
    public TimeSpan Waited { get; private set; }

    /// <summary>Everything up to <paramref name="streamBytes"/>, with <paramref name="zeroPages"/> zero pages among them, has been handed to the peer.</summary>
    public void Sent(long streamBytes, long zeroPages)
    {
        var at = Position.Of(streamBytes, zeroPages);
        lock (_gate)
        {
            if (at.Load <= _latest.Load) return;
            _latest = at;
            if (_marks.Count < MaxMarks) _marks.Enqueue((at, _time.GetTimestamp()));
        }
    }

    /// <summary>The receiver reports <paramref name="delivered"/> load taken by its QEMU.</summary>
    /// <exception cref="Wire.PeerProtocolException">the report goes backwards.</exception>
    public void OnProgress(long delivered)
    {
        TaskCompletionSource? wake;
        lock (_gate)
        {
            if (delivered < _delivered.Load)
                throw new Wire.PeerProtocolException($"progress went back from {_delivered.Load} to {delivered}");
            long now = _time.GetTimestamp();
            long sentAt = -1;
            while (_marks.Count > 0 && _marks.Peek().At.Load <= delivered)
                (_passed, sentAt) = _marks.Dequeue();
            if (sentAt >= 0) _minRoundTrip = Math.Min(_minRoundTrip, now - sentAt);
            _delivered = Interpolate(delivered);
            if (now - _rateSince >= _rateInterval)
            {
                double seconds = (double)(now - _rateSince) / _time.TimestampFrequency;
                _byteRates[_nextRate % RateSamples] = (_delivered.StreamBytes - _rateSinceDelivered.StreamBytes) / seconds;
                _zeroRates[_nextRate++ % RateSamples] = (_delivered.ZeroPages - _rateSinceDelivered.ZeroPages) / seconds;
                (_byteRate, _zeroRate) = (_byteRates.Max(), _zeroRates.Max());
                _rateSince = now;
                _rateSinceDelivered = _delivered;
            }
            wake = _waiter;
            _waiter = null;
        }
        wake?.TrySetResult();
    }

    // The receiver reports load alone; its zero pages are spread evenly between the sender's
    // positions around the report (a frame read from a run of zero pages carries thousands). The
    // count never goes back and never exceeds what the load can hold.
    private Position Interpolate(long delivered)
    {
        long zeros = _passed.ZeroPages;
        var next = _marks.Count > 0 ? _marks.Peek().At : _latest;
        long span = next.Load - _passed.Load;
        if (span > 0)
            zeros += (long)(Math.Clamp((double)(delivered - _passed.Load) / span, 0, 1) * (next.ZeroPages - _passed.ZeroPages));
        zeros = Math.Clamp(zeros, _delivered.ZeroPages, delivered >> QemuFormat.PageShift);
        return new Position(delivered, zeros);
    }

    private double Budget() =>
        (_minRoundTrip == long.MaxValue ? 0 : (double)_minRoundTrip / _time.TimestampFrequency) + Target.TotalSeconds;

    /// <summary>True when a sender at <paramref name="streamBytes"/>, <paramref name="zeroPages"/> zero pages among them, must wait before reading more.</summary>
    public bool MustWait(long streamBytes, long zeroPages)
    {
        var at = Position.Of(streamBytes, zeroPages);
        lock (_gate)
            return MustWaitLocked(at);
    }

    private bool MustWaitLocked(Position at)
    {
        long load = at.Load - _delivered.Load;
        if (load <= MinWindow) return false;
        if (load > MaxWindow || _byteRate <= 0) return true;
        double bytes = Math.Max(0, at.StreamBytes - _delivered.StreamBytes);
        double zeros = Math.Max(0, at.ZeroPages - _delivered.ZeroPages);
        double perZeroPage = (double)QemuFormat.PageSize / _byteRate;
        if (_zeroRate > 0) perZeroPage = Math.Min(perZeroPage, 1 / _zeroRate);
        return bytes / _byteRate + zeros * perZeroPage > Budget();
    }

    /// <summary>
    /// Waits until the sender at <paramref name="streamBytes"/> (<paramref name="zeroPages"/> zero
    /// pages among them) is within the window again. Everything up to there must already be on
    /// its way to the peer.
    /// </summary>
    /// <returns>How long it waited.</returns>
    /// <exception cref="TimeoutException">the receiver reported no progress for the stall timeout.</exception>
    public async Task<TimeSpan> WaitForRoomAsync(long streamBytes, long zeroPages, CancellationToken ct)
    {
        if (!MustWait(streamBytes, zeroPages)) return TimeSpan.Zero;
        var at = Position.Of(streamBytes, zeroPages);
        long start = _time.GetTimestamp();
        try
        {
            while (true)
            {
                Task progress;
                long before;
                lock (_gate)
                {
                    if (!MustWaitLocked(at)) return _time.GetElapsedTime(start);
                    _waiter ??= new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
                    progress = _waiter.Task;
                    before = _delivered.Load;
                }
                try
                {
                    await progress.WaitAsync(_stallTimeout, ct);
                }
                catch (TimeoutException)
                {
                    throw new TimeoutException(
                        $"the receiver reported no progress for {_stallTimeout.TotalSeconds:0} s (its QEMU took {before}, this side is at {at.Load})");
                }
            }
        }
        finally
        {
            Waits++;
            Waited += _time.GetElapsedTime(start);
        }
    }
}
