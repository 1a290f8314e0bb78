using System.Net;
using System.Net.Sockets;
using System.Runtime.InteropServices;

namespace BFMig.Transfer.Tests;

public partial class EndpointTests
{
    [LibraryImport("libc", SetLastError = true)]
    private static partial int dup(int fd);

    // An adopted TCP socket carries the switchover's small messages (NBD FLUSH replies, QEMU's
    // return path): with Nagle on they waited for the peer's delayed ACK (lab: 250 ms per FLUSH).
    [Fact]
    public void An_adopted_TCP_socket_has_Nagle_off_and_a_Unix_one_is_left_alone()
    {
        using var listener = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        listener.Bind(new IPEndPoint(IPAddress.Loopback, 0));
        listener.Listen(1);
        using var client = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        client.Connect(listener.LocalEndPoint!);
        using var accepted = listener.Accept();
        Assert.False(accepted.NoDelay); // as the daemon's listener hands it over

        int fd = dup((int)accepted.Handle);
        using var adopted = Endpoint.FromFd(fd);
        Assert.True(adopted.NoDelay);
        Assert.True(accepted.NoDelay); // the same kernel socket

        var (a, b) = UnixPair();
        using (a)
        using (b)
        {
            using var unix = Endpoint.FromFd(dup((int)a.Handle));
            Assert.Equal(AddressFamily.Unix, unix.AddressFamily);
        }
    }

    private static (Socket, Socket) UnixPair()
    {
        var path = Path.Combine(Path.GetTempPath(), $"bfmig-ep-{Guid.NewGuid():N}.sock");
        using var listener = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        listener.Bind(new UnixDomainSocketEndPoint(path));
        listener.Listen(1);
        var client = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        client.Connect(new UnixDomainSocketEndPoint(path));
        var server = listener.Accept();
        File.Delete(path);
        return (client, server);
    }
}
