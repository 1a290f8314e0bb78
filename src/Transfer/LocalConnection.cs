using System.Net.Sockets;

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

    public ValueTask DisposeAsync() => Stream.DisposeAsync();
}
