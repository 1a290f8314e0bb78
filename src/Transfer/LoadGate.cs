using System.Diagnostics;
using BFMig.Native.Linux;

namespace BFMig.Transfer;

/// <summary>
/// Holds a writer back while the local TCP peer (a destination QEMU) has more unread than it
/// loads in about <see cref="Horizon"/>: its receive queue plus this end's unsent bytes, asked of
/// the kernel (<see cref="TcpPeerQueue"/>). The limit follows QEMU's measured load rate between
/// <see cref="MinLimit"/> and <see cref="MaxLimit"/>, because bytes are a poor measure of QEMU's
/// work: a page into guest RAM that QEMU touches for the first time costs a fault that clears a
/// whole huge page, and the lab's destination loaded scattered pages at a few MB/s, so a fixed
/// 1 MiB left 300 ms of loading behind the mirror's FLUSH at the switchover. Owned by one
/// <see cref="LocalConnection"/>; not thread-safe.
/// </summary>
internal sealed class LoadGate(TcpPeerQueue queue) : IDisposable
{
    /// <summary>How long what QEMU holds unread may take it to load.</summary>
    public static readonly TimeSpan Horizon = TimeSpan.FromMilliseconds(10);
    public const long MinLimit = 64 << 10;
    public const long MaxLimit = 1 << 20;
    private static readonly long RateInterval = Stopwatch.Frequency / 50;

    private long _written;
    private long _unread;            // as last measured
    private long _writtenAtMeasure;  // _written when it was
    private long _markAt = Stopwatch.GetTimestamp();
    private long _markConsumed;
    private double _bytesPerSecond;
    private bool _measured;

    /// <summary>The current limit on what QEMU may hold unread (the most until its rate is known).</summary>
    public long Limit => !_measured ? MaxLimit
        : Math.Clamp((long)(_bytesPerSecond * Horizon.TotalSeconds), MinLimit, MaxLimit);

    /// <summary>Waits until <paramref name="next"/> more bytes may be written; returns how long it waited.</summary>
    public async ValueTask<TimeSpan> WaitAsync(int next, CancellationToken ct)
    {
        // What QEMU holds is at most what it held when last asked plus what was written since: no
        // need to ask while that bound leaves room.
        if (_unread + (_written - _writtenAtMeasure) + next <= Limit) return TimeSpan.Zero;
        long start = Stopwatch.GetTimestamp();
        while (Measure() && _unread + next > Limit)
            await Task.Delay(1, ct);
        return Stopwatch.GetElapsedTime(start);
    }

    /// <summary>Counts <paramref name="count"/> bytes written.</summary>
    public void Wrote(int count) => _written += count;

    // False when the kernel no longer answers (the peer closed): the writes that follow fail or not on their own.
    private bool Measure()
    {
        if (queue.Unread() is not { } unread)
        {
            _unread = 0;
            _writtenAtMeasure = _written;
            return false;
        }
        _unread = unread;
        _writtenAtMeasure = _written;
        long now = Stopwatch.GetTimestamp();
        if (now - _markAt >= RateInterval)
        {
            long consumed = _written - unread;
            double rate = (consumed - _markConsumed) * (double)Stopwatch.Frequency / (now - _markAt);
            // With bytes left unread QEMU was busy all along: that is how fast it loads now. Drained,
            // it may have waited for us, so the figure is only a floor.
            _bytesPerSecond = unread > 0 ? rate : Math.Max(_bytesPerSecond, rate);
            _measured = true;
            _markAt = now;
            _markConsumed = consumed;
        }
        return true;
    }

    public void Dispose() => queue.Dispose();
}
