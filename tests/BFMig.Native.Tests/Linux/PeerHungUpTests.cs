using System.Net;
using System.Net.Sockets;
using BFMig.Native.Linux;

namespace BFMig.Native.Tests.Linux;

/// <summary>
/// UnixSockets.PeerHungUp against the kernel's poll: the sending helper of a memory stream armed
/// for post-copy uses it to take its report back once QEMU hangs up, while its forward loop may
/// be held with QEMU's last bytes unread.
/// </summary>
public sealed class PeerHungUpTests
{
    [Theory]
    [InlineData(AddressFamily.InterNetwork)]
    [InlineData(AddressFamily.Unix)]
    public async Task A_peer_that_shuts_down_or_closes_is_seen_at_once_even_with_its_bytes_unread(AddressFamily family)
    {
        var (here, there) = await PairAsync(family);
        using var h = here;
        Assert.False(UnixSockets.PeerHungUp(here));

        there.Send(new byte[1000]);
        await UntilAsync(() => here.Available == 1000);
        Assert.False(UnixSockets.PeerHungUp(here)); // bytes waiting are no hang-up

        there.Shutdown(SocketShutdown.Send);
        await UntilAsync(() => UnixSockets.PeerHungUp(here));
        Assert.Equal(1000, here.Available); // nothing was read to see it
        there.Dispose();
        Assert.True(UnixSockets.PeerHungUp(here));
    }

    /// <summary>A socket already closed is refused, not polled: its descriptor number may belong to another file by now.</summary>
    [Fact]
    public async Task A_closed_socket_is_refused_not_polled()
    {
        var (here, there) = await PairAsync(AddressFamily.Unix);
        using var t = there;
        here.Dispose();
        Assert.Throws<ObjectDisposedException>(() => UnixSockets.PeerHungUp(here));
    }

    private static async Task<(Socket Here, Socket There)> PairAsync(AddressFamily family)
    {
        if (family == AddressFamily.Unix)
        {
            var path = Path.Combine(Path.GetTempPath(), $"bfmig-hup-{Guid.NewGuid():N}.sock");
            using var ul = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
            ul.Bind(new UnixDomainSocketEndPoint(path));
            ul.Listen(1);
            var uc = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
            await uc.ConnectAsync(new UnixDomainSocketEndPoint(path));
            var ua = await ul.AcceptAsync();
            File.Delete(path);
            return (ua, uc);
        }
        using var listener = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        listener.Bind(new IPEndPoint(IPAddress.Loopback, 0));
        listener.Listen(1);
        var client = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        await client.ConnectAsync(listener.LocalEndPoint!);
        return (await listener.AcceptAsync(), client);
    }

    private static async Task UntilAsync(Func<bool> condition)
    {
        var until = DateTime.UtcNow + TimeSpan.FromSeconds(5);
        while (!condition())
        {
            Assert.True(DateTime.UtcNow < until, "timed out");
            await Task.Delay(10);
        }
    }
}
