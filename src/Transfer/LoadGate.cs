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
/// 1 MiB left 300 ms of loading behind the mirror's FLUSH at the switchover.
/// <para>
/// Limits, rates and what QEMU holds are counted in load, not bytes (the writer says what each
/// write carries, <see cref="Wire.ProgressMessage.Load"/>): 1 MiB of zero pages' records is about
/// 100,000 zero pages, and a burst of them written within a byte limit set while QEMU loaded
/// elided pages fast kept the destination QEMU busy for 290 ms after the source paused the guest
/// (return trips, no rate limit). Where QEMU's read position falls inside a write, its load is
/// taken as spread evenly over the write's bytes.
/// </para>
/// Owned by one <see cref="LocalConnection"/>; not thread-safe.
/// </summary>
internal sealed class LoadGate(TcpPeerQueue queue) : IDisposable
{
    /// <summary>How long what QEMU holds unread may take it to load.</summary>
    public static readonly TimeSpan Horizon = TimeSpan.FromMilliseconds(10);
    public const long MinLimit = 64 << 10;
    public const long MaxLimit = 1 << 20;
    private static readonly long RateInterval = Stopwatch.Frequency / 50;
    private const int MaxWrites = 4096;

    private long _written;           // bytes
    private long _writtenLoad;
    // The writes QEMU may not have read all of yet: where each ends, in bytes and in load.
    private readonly Queue<(long Bytes, long Load)> _writes = new();
    private (long Bytes, long Load) _readWrite;   // the end of the last write QEMU has read whole
    private long _unread;            // load, as last measured
    private long _loadAtMeasure;     // _writtenLoad when it was
    private long _markAt = Stopwatch.GetTimestamp();
    private long _markConsumed;
    private double _loadPerSecond;
    private bool _measured;

    /// <summary>The current limit on the load QEMU may hold unread (the most until its rate is known).</summary>
    public long Limit => !_measured ? MaxLimit
        : Math.Clamp((long)(_loadPerSecond * Horizon.TotalSeconds), MinLimit, MaxLimit);

    /// <summary>Waits until a write carrying <paramref name="load"/> may go; returns how long it waited.</summary>
    public async ValueTask<TimeSpan> WaitAsync(long load, CancellationToken ct)
    {
        // What QEMU holds is at most what it held when last asked plus what was written since: no
        // need to ask while that bound leaves room.
        if (_unread + (_writtenLoad - _loadAtMeasure) + load <= Limit) return TimeSpan.Zero;
        long start = Stopwatch.GetTimestamp();
        // A write goes once QEMU holds nothing, whatever it carries: a piece may weigh a little
        // more than the smallest limit, and a drained QEMU's rate says nothing new.
        while (Measure() && _unread > 0 && _unread + load > Limit)
            await Task.Delay(1, ct);
        return Stopwatch.GetElapsedTime(start);
    }

    /// <summary>Counts a write of <paramref name="count"/> bytes that carried <paramref name="load"/>.</summary>
    public void Wrote(int count, long load)
    {
        _written += count;
        _writtenLoad += load;
        // Past the cap, consecutive writes merge into the next one recorded (or the end).
        if (_writes.Count < MaxWrites) _writes.Enqueue((_written, _writtenLoad));
    }

    // False when the kernel no longer answers (the peer closed): the writes that follow fail or not on their own.
    private bool Measure()
    {
        if (queue.Unread() is not { } unreadBytes)
        {
            _unread = 0;
            _loadAtMeasure = _writtenLoad;
            return false;
        }
        long consumed = LoadAt(_written - unreadBytes);
        _unread = _writtenLoad - consumed;
        _loadAtMeasure = _writtenLoad;
        long now = Stopwatch.GetTimestamp();
        if (now - _markAt >= RateInterval)
        {
            double rate = (consumed - _markConsumed) * (double)Stopwatch.Frequency / (now - _markAt);
            // With bytes left unread QEMU was busy all along: that is how fast it loads now. Drained,
            // it may have waited for us, so the figure is only a floor.
            _loadPerSecond = unreadBytes > 0 ? rate : Math.Max(_loadPerSecond, rate);
            _measured = true;
            _markAt = now;
            _markConsumed = consumed;
        }
        return true;
    }

    // The load QEMU has taken once it has read the first `bytes` bytes.
    private long LoadAt(long bytes)
    {
        if (bytes >= _written)
        {
            _writes.Clear();
            _readWrite = (_written, _writtenLoad);
            return _writtenLoad;
        }
        while (_writes.Count > 0 && _writes.Peek().Bytes <= bytes) _readWrite = _writes.Dequeue();
        var (endBytes, endLoad) = _writes.Count > 0 ? _writes.Peek() : (_written, _writtenLoad);
        return _readWrite.Load + (long)((double)(endLoad - _readWrite.Load) * (bytes - _readWrite.Bytes) / (endBytes - _readWrite.Bytes));
    }

    public void Dispose() => queue.Dispose();
}
