using System.Net.Sockets;
using BFMig.Daemon.Logging;
using Microsoft.Extensions.Logging;

namespace BFMig.Daemon.Sockets;

/// <summary>
/// Accepting on a listening socket until it is closed. An accept that fails while the socket is
/// still open (EMFILE or ENFILE when descriptors run out, ENOBUFS, ECONNABORTED: load or a peer can
/// cause each) is reported and retried after a pause that grows to a second, so that a listening
/// port never goes dark without a word while the daemon goes on as if it served it.
/// </summary>
internal static class AcceptLoop
{
    private static readonly TimeSpan FirstPause = TimeSpan.FromMilliseconds(50);
    private static readonly TimeSpan LongestPause = TimeSpan.FromSeconds(1);

    /// <summary>
    /// Hands every accepted connection to <paramref name="accepted"/> until <paramref name="stop"/>
    /// is cancelled or <paramref name="listener"/> is disposed. <paramref name="what"/> names the
    /// port in the log (event 9, at most 10 lines a minute).
    /// </summary>
    public static async Task RunAsync(Socket listener, string what, ILogger logger, Action<Socket> accepted, CancellationToken stop)
    {
        var limiter = new LogRateLimiter(10, TimeSpan.FromMinutes(1), TimeProvider.System);
        var pause = FirstPause;
        while (!stop.IsCancellationRequested)
        {
            Socket connection;
            try
            {
                connection = await listener.AcceptAsync(stop).ConfigureAwait(false);
            }
            catch (Exception e) when (e is OperationCanceledException or ObjectDisposedException
                || e is SocketException { SocketErrorCode: SocketError.OperationAborted } || stop.IsCancellationRequested)
            {
                return;
            }
            catch (SocketException e)
            {
                if (limiter.TryAcquire(out var suppressed))
                    DaemonLog.AcceptFailed(logger, what, e.Message, (int)pause.TotalMilliseconds, suppressed);
                try
                {
                    await Task.Delay(pause, stop).ConfigureAwait(false);
                }
                catch (OperationCanceledException)
                {
                    return;
                }
                pause = TimeSpan.FromTicks(Math.Min(LongestPause.Ticks, pause.Ticks * 2));
                continue;
            }
            pause = FirstPause;
            accepted(connection);
        }
    }
}
