using System.Net;
using System.Net.Sockets;

namespace BFMig.Transfer.Tests;

public class LocalConnectionTests
{
    // A destination QEMU that has not loaded what it was given holds the writer back: the backlog
    // it must load before it serves the mirror's FLUSH at the switchover stays short.
    [Fact]
    public async Task A_writer_waits_while_the_local_TCP_peer_holds_more_than_the_limit_unread()
    {
        using var listener = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        listener.Bind(new IPEndPoint(IPAddress.Loopback, 0));
        listener.Listen(1);
        var socket = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        await socket.ConnectAsync(listener.LocalEndPoint!);
        using var qemu = await listener.AcceptAsync();
        await using var connection = LocalConnection.FromSocket(socket);

        Assert.Equal(TimeSpan.Zero, await connection.WaitUntilReadAsync(CancellationToken.None));
        var chunk = new byte[LocalConnection.UnreadLimit + (512 << 10)];
        // Not awaited: on a host with small socket buffers the write itself waits for the reader.
        var write = connection.Stream.WriteAsync(chunk).AsTask();
        await Task.Delay(100);

        var wait = connection.WaitUntilReadAsync(CancellationToken.None).AsTask();
        await Task.Delay(200);
        Assert.False(wait.IsCompleted, "the writer went on while its peer held 1.5 MiB unread");

        var buffer = new byte[1 << 20];
        int read = 0;
        while (read < buffer.Length) read += await qemu.ReceiveAsync(buffer.AsMemory(read));
        var waited = await wait.WaitAsync(TimeSpan.FromSeconds(10));
        while (read < chunk.Length) read += await qemu.ReceiveAsync(buffer.AsMemory(0, Math.Min(buffer.Length, chunk.Length - read)));
        await write.WaitAsync(TimeSpan.FromSeconds(10));
        Assert.True(waited >= TimeSpan.FromMilliseconds(150), $"waited only {waited.TotalMilliseconds} ms");
    }

    [Fact]
    public async Task A_Unix_socket_peer_is_never_waited_for()
    {
        var path = Path.Combine(Path.GetTempPath(), $"bfmig-lc-{Guid.NewGuid():N}.sock");
        using var listener = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        listener.Bind(new UnixDomainSocketEndPoint(path));
        listener.Listen(1);
        var socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        await socket.ConnectAsync(new UnixDomainSocketEndPoint(path));
        using var peer = await listener.AcceptAsync();
        File.Delete(path);
        await using var connection = LocalConnection.FromSocket(socket);
        Assert.Equal(TimeSpan.Zero, await connection.WaitUntilReadAsync(CancellationToken.None));
    }
}
