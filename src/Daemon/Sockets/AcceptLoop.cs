using System.Net.Sockets;
using BFMig.Daemon.Logging;
using Microsoft.Extensions.Logging;

namespace BFMig.Daemon.Sockets;

/// <summary>
/// Accepting on a listening socket until it is closed. A connection that failed before it was
/// accepted (ECONNABORTED and the like: a peer can cause it) is passed over at once. Running out of
/// descriptors or buffers (EMFILE, ENFILE, ENOBUFS, ENOMEM: load can cause it) is reported and
/// retried after a pause that grows to a second, so that a listening socket never goes dark without
/// a word while the daemon goes on as if it served it. Any other error cannot clear by waiting: it
/// is reported and the loop ends (for the peer and transparent ports the daemon then stops,
/// BfmigDaemon.Supervise).
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
            // accept(2): errors of the pending connection itself are to be retried; each uses that connection up.
            catch (SocketException e) when (e.SocketErrorCode is SocketError.ConnectionAborted or SocketError.ConnectionReset
                or SocketError.Interrupted or SocketError.NetworkDown or SocketError.NetworkUnreachable or SocketError.HostDown
                or SocketError.HostUnreachable or SocketError.ProtocolOption or SocketError.OperationNotSupported)
            {
                continue;
            }
            catch (SocketException e) when (e.SocketErrorCode is not (SocketError.TooManyOpenSockets or SocketError.NoBufferSpaceAvailable))
            {
                DaemonLog.AcceptEnded(logger, what, e.Message);
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
