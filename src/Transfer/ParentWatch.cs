using System.Globalization;

namespace BFMig.Transfer;

/// <summary>
/// A helper started by bfmigd lives and dies with its trip's owner: when the daemon is gone
/// (its parent changed: the kernel handed the helper to init or a subreaper), nobody would
/// record the trip's outcome or the guest's new location, so the stream is given up and the
/// migration fails on both sides with the guest still on the source. Polls
/// <c>/proc/self/stat</c>; no signal set-up that a runtime thread's exit could trigger.
/// </summary>
public sealed class ParentWatch : IAsyncDisposable
{
    private readonly CancellationTokenSource _stop = new();
    private readonly Task _loop;

    private ParentWatch(int parent, TimeSpan interval, Action onGone) =>
        _loop = Task.Run(() => LoopAsync(parent, interval, onGone));

    /// <summary>Calls <paramref name="onGone"/> once, soon after this process's current parent exits.</summary>
    public static ParentWatch Start(TimeSpan interval, Action onGone) => new(ParentPid(), interval, onGone);

    /// <summary>This process's parent pid, from <c>/proc/self/stat</c> (0 when unreadable).</summary>
    public static int ParentPid()
    {
        try
        {
            // "pid (comm) state ppid ...": comm may contain spaces and parentheses, so parse after the last ')'.
            var stat = File.ReadAllText("/proc/self/stat");
            var fields = stat[(stat.LastIndexOf(')') + 2)..].Split(' ');
            return int.Parse(fields[1], CultureInfo.InvariantCulture);
        }
        catch (Exception e) when (e is IOException or FormatException or IndexOutOfRangeException or ArgumentOutOfRangeException)
        {
            return 0;
        }
    }

    private async Task LoopAsync(int parent, TimeSpan interval, Action onGone)
    {
        try
        {
            while (true)
            {
                await Task.Delay(interval, _stop.Token);
                int now = ParentPid();
                if (now != 0 && now != parent)
                {
                    onGone();
                    return;
                }
            }
        }
        catch (OperationCanceledException)
        {
            // Disposed.
        }
    }

    /// <inheritdoc/>
    public async ValueTask DisposeAsync()
    {
        await _stop.CancelAsync();
        await _loop;
        _stop.Dispose();
    }
}
