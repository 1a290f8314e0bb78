namespace BFMig.Native.Linux;

/// <summary>
/// CPU time of the whole process, all threads (CLOCK_PROCESS_CPUTIME_ID, nanosecond resolution;
/// <c>Process.TotalProcessorTime</c> reads /proc in 10 ms ticks, too coarse for short runs).
/// </summary>
public static class ProcessClock
{
    private const int ClockProcessCpuTime = 2;

    /// <summary>User + system CPU time used by this process so far.</summary>
    public static unsafe TimeSpan CpuTime
    {
        get
        {
            Interop.Libc.Timespec ts;
            if (Interop.Libc.ClockGetTime(ClockProcessCpuTime, &ts) != 0)
                throw new InvalidOperationException("clock_gettime(CLOCK_PROCESS_CPUTIME_ID) failed");
            return TimeSpan.FromTicks((ts.Seconds * TimeSpan.TicksPerSecond) + (ts.Nanoseconds / 100));
        }
    }
}
