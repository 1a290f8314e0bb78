using System.Net;
using System.Net.Sockets;
using BFMig.Native.Linux;

namespace BFMig.Native.Tests.Linux;

/// <summary>TcpPeerQueue against the kernel's real sock_diag, over a loopback connection.</summary>
public sealed class TcpPeerQueueTests
{
    [Fact]
    public void The_peers_unread_bytes_are_what_it_has_not_read_yet()
    {
        var (writer, reader) = LoopbackPair();
        using var w = writer;
        using var r = reader;
        using var queue = TcpPeerQueue.For(writer);
        Assert.NotNull(queue);
        Assert.Equal(0, queue.Unread());

        writer.Send(new byte[100_000]);
        Assert.Equal(100_000, WaitFor(queue, 100_000));

        var buffer = new byte[60_000];
        int read = 0;
        while (read < buffer.Length) read += reader.Receive(buffer, read, buffer.Length - read, SocketFlags.None);
        Assert.Equal(40_000, WaitFor(queue, 40_000));

        // Nothing is unread the other way.
        using var back = TcpPeerQueue.For(reader);
        Assert.Equal(0, back!.Unread());
    }

    [Fact]
    public void A_peer_that_is_gone_or_a_Unix_socket_gives_no_answer()
    {
        var (writer, reader) = LoopbackPair();
        using var w = writer;
        using var queue = TcpPeerQueue.For(writer)!;
        reader.Close();
        // Closed with nothing unread: the kernel drops the socket at once (or keeps it in a closing state with an empty queue).
        Assert.True(queue.Unread() is null or 0);

        using var unix = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        Assert.Null(TcpPeerQueue.For(unix));
    }

    // A connected pair (writer, accepted reader); the listener is closed, so no lookup can fall back to it.
    private static (Socket Writer, Socket Reader) LoopbackPair()
    {
        using var listener = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        listener.Bind(new IPEndPoint(IPAddress.Loopback, 0));
        listener.Listen(1);
        var writer = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        writer.Connect(listener.LocalEndPoint!);
        return (writer, listener.Accept());
    }

    // Loopback delivers within the send call, but leave the kernel a moment on a loaded machine.
    private static long? WaitFor(TcpPeerQueue queue, long expected)
    {
        long? unread = null;
        for (int i = 0; i < 200 && unread != expected; i++)
        {
            unread = queue.Unread();
            if (unread != expected) Thread.Sleep(5);
        }
        return unread;
    }
}
