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
        Assert.Equal($"the bfmigd of peer b at 127.0.0.1:{Port(old)} closed the version probe unanswered: a bfmigd before protocol 9, or one refusing connections (its log says which)", why);
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
        var replies = new Queue<Task<string?>>();
        var pending = new TaskCompletionSource<string?>(TaskCreationOptions.RunContinuationsAsynchronously);
        replies.Enqueue(pending.Task);
        int asked = 0;
        var answers = new PeerProbeAnswers(_ => { asked++; return replies.Dequeue(); }, TimeSpan.FromSeconds(2), TimeSpan.FromSeconds(10), clock);
        var peer = Peer(9);
        // A memory stream and its channels ask while the first probe is in flight: one probe, one answer.
        var first = answers.WhyNotAsync(peer);
        var second = answers.WhyNotAsync(peer);
        pending.SetResult(null);
        Assert.Null(await first);
        Assert.Null(await second);
        Assert.Equal(1, asked);
        // "Same version" is reused for 2 s from its answer, then asked again.
        clock.Advance(TimeSpan.FromSeconds(1.5));
        Assert.Null(await answers.WhyNotAsync(peer));
        Assert.Equal(1, asked);
        clock.Advance(TimeSpan.FromSeconds(1));
        replies.Enqueue(Task.FromResult<string?>("speaks protocol 10"));
        Assert.Equal("speaks protocol 10", await answers.WhyNotAsync(peer));
        Assert.Equal(2, asked);
        // A "no" is reused for 10 s.
        clock.Advance(TimeSpan.FromSeconds(9));
        Assert.Equal("speaks protocol 10", await answers.WhyNotAsync(peer));
        Assert.Equal(2, asked);
        // Another peer is asked on its own.
        replies.Enqueue(Task.FromResult<string?>("does not answer"));
        Assert.Equal("does not answer", await answers.WhyNotAsync(Peer(10) with { Name = "c" }));
        Assert.Equal(3, asked);
        clock.Advance(TimeSpan.FromSeconds(2));
        replies.Enqueue(Task.FromResult<string?>(null));
        Assert.Null(await answers.WhyNotAsync(peer));
        Assert.Equal(4, asked);
    }

    [Fact]
    public async Task A_probe_that_threw_is_not_reused()
    {
        int asked = 0;
        var answers = new PeerProbeAnswers(
            _ => ++asked == 1 ? Task.FromException<string?>(new InvalidOperationException("ours")) : Task.FromResult<string?>(null),
            TimeSpan.FromSeconds(2), TimeSpan.FromSeconds(10), new Ticks());
        await Assert.ThrowsAsync<InvalidOperationException>(() => answers.WhyNotAsync(Peer(9)));
        Assert.Null(await answers.WhyNotAsync(Peer(9)));
        Assert.Equal(2, asked);
    }

    [Fact]
    public void A_multifd_channel_follows_its_guests_main_stream_while_that_is_carried()
    {
        var mains = new CarriedMainStreams();
        Guid guest = Guid.NewGuid(), other = Guid.NewGuid();
        var to = new IPEndPoint(IPAddress.Parse("198.18.0.2"), 49152);
        Assert.Null(mains.ChannelMustFollow(guest));
        var first = mains.Carrying(guest, to, "every transfer slot is taken (transfer:max_concurrent)");
        Assert.Equal("its main stream is carried (every transfer slot is taken (transfer:max_concurrent))", mains.ChannelMustFollow(guest));
        Assert.Null(mains.ChannelMustFollow(other));
        // The attempt failed: its main connection closed, and a retry's channels decide afresh.
        first.Dispose();
        Assert.Null(mains.ChannelMustFollow(guest));
        // A newer main stream of the same guest is not ended by an older one's close.
        var older = mains.Carrying(guest, to, "older");
        using var newer = mains.Carrying(guest, to, "newer");
        older.Dispose();
        older.Dispose();
        Assert.Equal("its main stream is carried (newer)", mains.ChannelMustFollow(guest));
    }

    /// <summary>
    /// A silent connection is QEMU's post-copy preempt channel only on the port the guest's
    /// carried memory stream goes to: the disk mirror of the same guest has a port of its own.
    /// </summary>
    [Fact]
    public void A_carried_main_stream_is_known_by_where_it_goes()
    {
        var mains = new CarriedMainStreams();
        Guid guest = Guid.NewGuid(), other = Guid.NewGuid();
        var to = new IPEndPoint(IPAddress.Parse("198.18.0.2"), 49152);
        using (mains.Carrying(guest, to, "the peer's bfmigd does not answer"))
        using (mains.Carrying(other, new IPEndPoint(IPAddress.Parse("198.18.0.2"), 49154), "the peer's bfmigd does not answer"))
        {
            Assert.Equal(guest, mains.GuestGoingTo(new IPEndPoint(IPAddress.Parse("198.18.0.2"), 49152)));
            Assert.Null(mains.GuestGoingTo(new IPEndPoint(IPAddress.Parse("198.18.0.2"), 49153)));
            Assert.Null(mains.GuestGoingTo(new IPEndPoint(IPAddress.Parse("198.18.0.3"), 49152)));
            Assert.Equal(other, mains.GuestGoingTo(new IPEndPoint(IPAddress.Parse("198.18.0.2"), 49154)));
        }
        Assert.Null(mains.GuestGoingTo(to));
    }

    private sealed class Ticks : TimeProvider
    {
        private long _now = 1;

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
