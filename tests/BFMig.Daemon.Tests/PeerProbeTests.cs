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
    private static readonly TimeSpan Timeout = TimeSpan.FromSeconds(5);

    [Fact]
    public async Task Nobody_listening_does_not_answer()
    {
        // Bound and not listening: the port refuses connections and stays ours during the test.
        using var closed = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        closed.Bind(new IPEndPoint(IPAddress.Loopback, 0));
        var why = await PeerProbe.WhyNotAsync(Peer(closed), Timeout, CancellationToken.None);
        Assert.Equal($"the bfmigd of peer b at 127.0.0.1:{Port(closed)} does not answer", why);
    }

    [Fact]
    public async Task A_bfmigd_from_before_the_probe_closes_it_and_is_not_used()
    {
        using var old = Listen();
        // What PeerListener did before protocol 9 with a first frame it did not know: peek at the
        // whole frame, refuse it and close with it unread (the kernel then resets the connection).
        var server = Task.Run(async () =>
        {
            using var c = await old.AcceptAsync();
            var peek = new byte[VersionProbe.FrameLength];
            while (c.Receive(peek, SocketFlags.Peek) < peek.Length)
                await Task.Delay(5);
        });
        var why = await PeerProbe.WhyNotAsync(Peer(old), Timeout, CancellationToken.None);
        await server;
        Assert.Equal($"the bfmigd of peer b at 127.0.0.1:{Port(old)} closed the version probe unanswered: a bfmigd before protocol 9", why);
    }

    [Theory]
    [InlineData(FrameCodec.ProtocolVersion - 1, 0)]
    [InlineData(FrameCodec.ProtocolVersion + 1, 0)]
    [InlineData(FrameCodec.ProtocolVersion + 1, 5)]
    public async Task A_bfmigd_of_another_protocol_is_named_with_both_versions(int version, int appended)
    {
        using var other = Listen();
        var server = Task.Run(async () =>
        {
            using var c = await other.AcceptAsync();
            var question = await VersionProbe.ReadFrameAsync(c, CancellationToken.None);
            Assert.NotNull(question);
            Assert.Equal(FrameCodec.ProtocolVersion, VersionProbe.Decode(question));
            // A later version may say more after its version: read past it.
            var answer = VersionProbe.Encode((ushort)version);
            byte[] longer = [.. answer, .. new byte[appended]];
            longer[7] = (byte)(VersionProbe.PayloadLength + appended);
            await c.SendAsync(longer, SocketFlags.None);
        });
        var why = await PeerProbe.WhyNotAsync(Peer(other), Timeout, CancellationToken.None);
        await server;
        Assert.Equal($"the bfmigd of peer b at 127.0.0.1:{Port(other)} speaks protocol {version}, this one {FrameCodec.ProtocolVersion}", why);
    }

    [Fact]
    public async Task A_silent_peer_is_given_up_at_the_timeout()
    {
        using var silent = Listen();
        var started = DateTime.UtcNow;
        var why = await PeerProbe.WhyNotAsync(Peer(silent), TimeSpan.FromMilliseconds(300), CancellationToken.None);
        Assert.Equal($"the bfmigd of peer b at 127.0.0.1:{Port(silent)} did not answer the version probe within 0.3 s", why);
        Assert.InRange(DateTime.UtcNow - started, TimeSpan.FromMilliseconds(250), TimeSpan.FromSeconds(10));
    }

    [Fact]
    public async Task One_answer_serves_every_stream_that_asks_within_the_reuse_time()
    {
        var clock = new Ticks();
        int asked = 0;
        var pending = new TaskCompletionSource<string?>(TaskCreationOptions.RunContinuationsAsynchronously);
        var answers = new PeerProbeAnswers(_ => { asked++; return asked == 1 ? pending.Task : Task.FromResult<string?>("second"); },
            TimeSpan.FromSeconds(10), clock);
        var peer = Peer(9);
        // A memory stream and its channels ask while the first probe is in flight: one probe, one answer.
        var first = answers.WhyNotAsync(peer);
        var second = answers.WhyNotAsync(peer);
        Assert.Same(first, second);
        pending.SetResult(null);
        Assert.Null(await second);
        clock.Advance(TimeSpan.FromSeconds(9));
        Assert.Null(await answers.WhyNotAsync(peer));
        Assert.Equal(1, asked);
        // Another peer is asked on its own.
        Assert.Equal("second", await answers.WhyNotAsync(Peer(10) with { Name = "c" }));
        Assert.Equal(2, asked);
        // After the reuse time the next migration asks again.
        clock.Advance(TimeSpan.FromSeconds(2));
        Assert.Equal("second", await answers.WhyNotAsync(peer));
        Assert.Equal(3, asked);
    }

    [Fact]
    public async Task A_probe_that_threw_is_not_reused()
    {
        int asked = 0;
        var answers = new PeerProbeAnswers(
            _ => ++asked == 1 ? Task.FromException<string?>(new InvalidOperationException("ours")) : Task.FromResult<string?>(null),
            TimeSpan.FromSeconds(10), new Ticks());
        await Assert.ThrowsAsync<InvalidOperationException>(() => answers.WhyNotAsync(Peer(9)));
        Assert.Null(await answers.WhyNotAsync(Peer(9)));
        Assert.Equal(2, asked);
    }

    private sealed class Ticks : TimeProvider
    {
        private long _now;

        public override long TimestampFrequency => TimeSpan.TicksPerSecond;

        public override long GetTimestamp() => _now;

        public void Advance(TimeSpan by) => _now += by.Ticks;
    }

    private static Socket Listen()
    {
        var s = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        s.Bind(new IPEndPoint(IPAddress.Loopback, 0));
        s.Listen(4);
        return s;
    }

    private static int Port(Socket s) => ((IPEndPoint)s.LocalEndPoint!).Port;

    private static PeerOptions Peer(Socket s) => Peer(Port(s));

    private static PeerOptions Peer(int port) => new("b", "127.0.0.1", port, "test:///default");
}
