using System.Net.Sockets;
using BFMig.Daemon.Logging;
using Microsoft.Extensions.Logging;

namespace BFMig.Daemon.Sockets;

/// <summary>
/// Accepting on a listening socket until it is closed. A connection that failed before it was
/// accepted (ECONNABORTED and the like: a peer can cause it) is passed over at once. An error of
/// the listening socket itself (EINVAL: it no longer listens; ENOTSOCK, EFAULT) cannot clear by
/// waiting: it is reported (event 36) and the loop ends (for the peer and transparent ports the
/// daemon then stops, BfmigDaemon.Supervise; a guest's socket is rebuilt by the next
/// MigrationSockets.Ensure). Any other error (EMFILE, ENFILE, ENOBUFS, ENOMEM, EPROTO, and
/// whatever errno .NET does not name) is reported and retried after a pause that grows to a
/// second: load can cause it and load passes, so a listening socket never goes dark without a word
/// while the daemon goes on as if it served it, and never spins on an error that persists.
/// </summary>
internal static class AcceptLoop
{
    /// <summary>What an accept error means for the loop.</summary>
    internal enum AcceptError
    {
        /// <summary>That pending connection failed; the next one is accepted at once.</summary>
        PassOver,
        /// <summary>Retried after a pause, reported (rate-limited).</summary>
        Retry,
        /// <summary>The listening socket itself is broken: reported, and the loop ends.</summary>
        Ends,
    }

    /// <summary>The rule, by the error accept(2) gave.</summary>
    internal static AcceptError Judge(SocketError error) => error switch
    {
        // accept(2): errors of the pending connection itself are to be retried; each uses that connection up.
        SocketError.ConnectionAborted or SocketError.ConnectionReset or SocketError.Interrupted or SocketError.NetworkDown
            or SocketError.NetworkUnreachable or SocketError.HostDown or SocketError.HostUnreachable
            or SocketError.ProtocolOption or SocketError.OperationNotSupported => AcceptError.PassOver,
        // The socket no longer listens (EINVAL), is no socket, or its address is bad: waiting changes nothing.
        SocketError.InvalidArgument or SocketError.NotSocket or SocketError.Fault => AcceptError.Ends,
        // EMFILE, ENFILE, ENOBUFS, ENOMEM, EPROTO, an errno .NET does not name (SocketError.SocketError): load passes.
        _ => AcceptError.Retry,
    };

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
                switch (Judge(e.SocketErrorCode))
                {
                    case AcceptError.PassOver:
                        continue;
                    case AcceptError.Ends:
                        DaemonLog.AcceptEnded(logger, what, e.Message);
                        return;
                }
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
