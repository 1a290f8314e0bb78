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
    public async Task An_adopted_TCP_socket_has_Nagle_off_and_a_Unix_one_is_left_alone()
    {
        var (client, accepted) = await WireTests.TcpPair();
        using (client)
        using (accepted)
        {
            Assert.False(accepted.NoDelay); // as the daemon's listener hands it over
            using var adopted = Endpoint.FromFd(dup((int)accepted.Handle));
            Assert.True(adopted.NoDelay);
            Assert.True(accepted.NoDelay); // the same kernel socket
        }

        var (a, b) = await WireTests.Pair();
        using (a)
        using (b)
        {
            using var unix = Endpoint.FromFd(dup((int)a.Handle));
            Assert.Equal(AddressFamily.Unix, unix.AddressFamily);
        }
    }
}
