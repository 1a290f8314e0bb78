using System.Net.Sockets;

namespace BFMig.Transfer.Wire;

/// <summary>Socket settings of a connection between two helpers.</summary>
public static class PeerSockets
{
    /// <summary>Seconds of silence before the kernel's first keepalive probe.</summary>
    public const int KeepAliveIdleSeconds = 30;

    /// <summary>Seconds between unanswered probes.</summary>
    public const int KeepAliveIntervalSeconds = 10;

    /// <summary>Unanswered probes after which the kernel resets the connection.</summary>
    public const int KeepAliveProbes = 6;

    /// <summary>
    /// Turns on TCP keepalive, so that a peer host that vanished (power lost, cable pulled) is
    /// noticed within about 90 s even on a stream that has no idle timeout of its own: QEMU's
    /// post-copy preempt channel, silent until the destination faults on a page, and any memory
    /// stream once it went post-copy (<see cref="FrameReader.IdleTimeout"/>). A live peer
    /// answers the probes from its kernel, however long QEMU stays silent. Not a TCP socket
    /// (the tests' socket pairs; told as <see cref="Endpoint.LowLatency"/> tells it, since a
    /// socket bfmigd passed by descriptor does not know its protocol): nothing to do.
    /// </summary>
    public static void KeepAlive(Socket socket)
    {
        if (!BFMig.Native.Linux.UnixSockets.IsTcp(socket)) return;
        try
        {
            socket.SetSocketOption(SocketOptionLevel.Socket, SocketOptionName.KeepAlive, true);
            socket.SetSocketOption(SocketOptionLevel.Tcp, SocketOptionName.TcpKeepAliveTime, KeepAliveIdleSeconds);
            socket.SetSocketOption(SocketOptionLevel.Tcp, SocketOptionName.TcpKeepAliveInterval, KeepAliveIntervalSeconds);
            socket.SetSocketOption(SocketOptionLevel.Tcp, SocketOptionName.TcpKeepAliveRetryCount, KeepAliveProbes);
        }
        catch (SocketException)
        {
            // Without keepalive a vanished peer holds a silent channel until QEMU ends it, as over a plain socket.
        }
    }
}
