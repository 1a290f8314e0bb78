using System.Net;
using System.Net.Sockets;
using BFMig.Daemon.Configuration;
using BFMig.Daemon.Transparent;
using BFMig.Transfer.Wire;

namespace BFMig.Daemon.Tests;

/// <summary>
/// The transparent pre-check against peers that must not get a helper's stream: none listening,
/// one from before the probe (it refuses the frame and closes), one of another protocol (a
/// rolling upgrade), one that never answers. The real bfmigd's answer: PeerPortTests.
/// </summary>
public sealed class PeerProbeTests
{
    private static readonly TimeSpan Timeout = TimeSpan.FromSeconds(2);

    [Fact]
    public async Task Nobody_listening_does_not_answer()
    {
        int port;
        using (var gone = Listen())
            port = ((IPEndPoint)gone.LocalEndPoint!).Port;
        var why = await PeerProbe.WhyNotAsync(Peer(port), Timeout, CancellationToken.None);
        Assert.Equal($"the bfmigd of peer b at 127.0.0.1:{port} does not answer", why);
    }

    [Fact]
    public async Task A_bfmigd_from_before_the_probe_closes_it_and_is_not_used()
    {
        using var old = Listen();
        // What an older PeerListener does with a first frame it does not know: close unanswered.
        var server = Task.Run(async () =>
        {
            using var c = await old.AcceptAsync();
            await Task.Delay(50);
        });
        var why = await PeerProbe.WhyNotAsync(Peer(old), Timeout, CancellationToken.None);
        await server;
        Assert.NotNull(why);
        Assert.Contains("version probe", why, StringComparison.Ordinal);
    }

    [Theory]
    [InlineData(FrameCodec.ProtocolVersion - 1)]
    [InlineData(FrameCodec.ProtocolVersion + 1)]
    public async Task A_bfmigd_of_another_protocol_is_named_with_both_versions(int version)
    {
        using var other = Listen();
        var server = Task.Run(async () =>
        {
            using var c = await other.AcceptAsync();
            var question = new byte[VersionProbe.FrameLength];
            for (int read = 0; read < question.Length;)
                read += await c.ReceiveAsync(question.AsMemory(read), SocketFlags.None);
            Assert.Equal(FrameCodec.ProtocolVersion, VersionProbe.Decode(question));
            await c.SendAsync(VersionProbe.Encode((ushort)version), SocketFlags.None);
        });
        var why = await PeerProbe.WhyNotAsync(Peer(other), Timeout, CancellationToken.None);
        await server;
        Assert.Equal($"the bfmigd of peer b at 127.0.0.1:{((IPEndPoint)other.LocalEndPoint!).Port} speaks protocol {version}, this one {FrameCodec.ProtocolVersion}", why);
    }

    [Fact]
    public async Task A_silent_peer_is_given_up_at_the_timeout()
    {
        using var silent = Listen();
        var started = DateTime.UtcNow;
        var why = await PeerProbe.WhyNotAsync(Peer(silent), TimeSpan.FromMilliseconds(300), CancellationToken.None);
        Assert.NotNull(why);
        Assert.Contains("did not answer the version probe", why, StringComparison.Ordinal);
        Assert.InRange(DateTime.UtcNow - started, TimeSpan.FromMilliseconds(250), TimeSpan.FromSeconds(10));
    }

    private static Socket Listen()
    {
        var s = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        s.Bind(new IPEndPoint(IPAddress.Loopback, 0));
        s.Listen(4);
        return s;
    }

    private static PeerOptions Peer(Socket listener) => Peer(((IPEndPoint)listener.LocalEndPoint!).Port);

    private static PeerOptions Peer(int port) => new("b", "127.0.0.1", port, "test:///default");
}
