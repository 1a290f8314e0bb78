using System.Diagnostics;
using System.Net.Sockets;
using BFMig.Native.Linux;

namespace BFMig.Transfer;

/// <summary>The connection to the local QEMU (or qemu-nbd): a stream, and the socket when there is one (for half-close).</summary>
public sealed class LocalConnection : IAsyncDisposable
{
    public LocalConnection(Stream stream, Socket? socket)
    {
        Stream = stream;
        Socket = socket;
    }

    /// <summary>Wraps a connected socket.</summary>
    public static LocalConnection FromSocket(Socket socket) => new(new NetworkStream(socket, ownsSocket: true), socket);

    public Stream Stream { get; }
    public Socket? Socket { get; }

    /// <summary>Bytes readable now without blocking (0 when unknown).</summary>
    public int Available
    {
        get
        {
            try
            {
                return Socket?.Available ?? 0;
            }
            catch (ObjectDisposedException)
            {
                return 0;
            }
        }
    }

    /// <summary>Tells the local side no more bytes will come (shutdown(SHUT_WR)); the other direction stays open.</summary>
    public void HalfClose()
    {
        try
        {
            Socket?.Shutdown(SocketShutdown.Send);
        }
        catch (SocketException)
        {
        }
        catch (ObjectDisposedException)
        {
        }
    }

    /// <summary>How much a local TCP peer may hold received but not read before <see cref="WaitUntilReadAsync"/> waits.</summary>
    public const long UnreadLimit = 1L << 20;

    private TcpPeerQueue? _peerQueue;
    private bool _peerQueueTried;

    /// <summary>
    /// Waits until the local end has read all but <see cref="UnreadLimit"/> bytes of what was
    /// written to it; returns how long that took. A write completes once the bytes sit in the
    /// reader's receive queue, which the kernel grows up to <c>tcp_rmem</c>'s maximum (32 MiB on
    /// the lab's hosts): a destination QEMU must load all of it before it serves anything else,
    /// the mirror's FLUSH at the switchover included (lab, 1 Gbit/s: 20-24 MiB queued when the
    /// guest paused). Writing only into a short queue keeps that backlog small and makes the
    /// receiver's progress reports, which pace the sender, say what QEMU really loaded. Unix
    /// sockets (small, fixed buffers) and peers the kernel cannot name are not waited for.
    /// </summary>
    public async ValueTask<TimeSpan> WaitUntilReadAsync(CancellationToken ct)
    {
        if (!_peerQueueTried)
        {
            _peerQueueTried = true;
            _peerQueue = Socket is null ? null : TcpPeerQueue.For(Socket);
        }
        if (_peerQueue is null || _peerQueue.Unread() is not > UnreadLimit) return TimeSpan.Zero;
        long start = Stopwatch.GetTimestamp();
        while (_peerQueue.Unread() is > UnreadLimit)
            await Task.Delay(1, ct);
        return Stopwatch.GetElapsedTime(start);
    }

    public ValueTask DisposeAsync()
    {
        _peerQueue?.Dispose();
        return Stream.DisposeAsync();
    }
}
