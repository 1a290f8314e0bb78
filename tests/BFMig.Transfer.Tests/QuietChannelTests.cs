using System.Net.Sockets;
using BFMig.Transfer.Wire;

namespace BFMig.Transfer.Tests;

/// <summary>
/// QEMU's post-copy preempt channel (QEMU 10 with libvirt 11): a memory connection that follows
/// the main stream and on which QEMU writes nothing until the destination faults on a page, while
/// the destination QEMU waits for that very connection before it runs the guest. Before, the
/// sending helper waited for its first bytes before it said hello, the receiving daemon dropped the
/// connection after 5 s, and the trip hung for ever (docs/lab-results/postcopy-hang).
/// </summary>
public class QuietChannelTests
{
    private static readonly Guid Guest = Guid.Parse("0b7c55a4-6a1f-4f55-9c36-2f1e0a9d8c11");

    // armed: the main stream's helper reported it armed for post-copy (no wait for the silence).
    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public async Task A_silent_follower_reaches_the_destination_at_once_and_outlives_the_idle_timeout(bool armed)
    {
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(30));
        var (qemuSrc, senderLocal) = await WireTests.Pair();
        var (senderPeer, receiverPeer) = await WireTests.Pair();
        var (receiverLocal, qemuDst) = await WireTests.Pair();
        var idle = TimeSpan.FromMilliseconds(600);
        var so = new TransferOptions { Guest = Guest, StoreRoot = null, PeerName = "hostB", IdleTimeout = idle, FollowsMain = true, MainPostCopyArmed = armed };
        Assert.Equal(armed ? TimeSpan.Zero : TransferRunner.FollowerFirstBytesWait, TransferRunner.FollowerWait(so.MainPostCopyArmed));
        var ro = new TransferOptions { Guest = Guest, StoreRoot = null, IdleTimeout = idle };
        var connected = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        var send = Task.Run(() => TransferRunner.SendAsync(LocalConnection.FromSocket(senderLocal), senderPeer, so, cts.Token));
        var receive = Task.Run(() => TransferRunner.ReceiveAsync(receiverPeer, _ =>
        {
            connected.SetResult();
            return Task.FromResult(LocalConnection.FromSocket(receiverLocal));
        }, ro, cts.Token));

        // The destination QEMU gets its connection while the source QEMU has said nothing yet.
        await connected.Task.WaitAsync(TimeSpan.FromSeconds(5), cts.Token);
        // Silence on both sides for more than three idle timeouts: nothing may give up.
        await Task.Delay(idle * 3, cts.Token);
        Assert.False(send.IsCompleted, $"the sender ended during the silence: {send.Exception?.InnerException?.Message}");
        Assert.False(receive.IsCompleted, $"the receiver ended during the silence: {receive.Exception?.InnerException?.Message}");

        // A faulted page goes source to destination, byte for byte; then the source closes.
        var page = Enumerable.Range(0, 3 * 4096).Select(i => (byte)(i * 7 + 1)).ToArray();
        using var src = new NetworkStream(qemuSrc, ownsSocket: true);
        using var dst = new NetworkStream(qemuDst, ownsSocket: true);
        await src.WriteAsync(page, cts.Token);
        qemuSrc.Shutdown(SocketShutdown.Send);
        var delivered = new MemoryStream();
        await dst.CopyToAsync(delivered, cts.Token);
        qemuDst.Shutdown(SocketShutdown.Send);

        var (sent, received) = (await send, await receive);
        Assert.Equal(page, delivered.ToArray());
        Assert.Equal(("quiet-channel", "quiet-channel"), (sent.Mode, received.Mode));
    }

    // Armed or not: bytes already waiting say it is no preempt channel.
    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public async Task A_follower_that_speaks_at_once_is_no_quiet_channel(bool armed)
    {
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(30));
        var (qemuSrc, senderLocal) = await WireTests.Pair();
        var (senderPeer, receiverPeer) = await WireTests.Pair();
        var (receiverLocal, qemuDst) = await WireTests.Pair();
        var so = new TransferOptions { Guest = Guest, StoreRoot = null, PeerName = "hostB", FollowsMain = true, MainPostCopyArmed = armed };
        var ro = new TransferOptions { Guest = Guest, StoreRoot = null };
        var bytes = "not a stream this helper parses, carried byte for byte"u8.ToArray();
        using var src = new NetworkStream(qemuSrc, ownsSocket: true);
        await src.WriteAsync(bytes, cts.Token);
        qemuSrc.Shutdown(SocketShutdown.Send);
        var send = Task.Run(() => TransferRunner.SendAsync(LocalConnection.FromSocket(senderLocal), senderPeer, so, cts.Token));
        var receive = Task.Run(() => TransferRunner.ReceiveAsync(receiverPeer, _ => Task.FromResult(LocalConnection.FromSocket(receiverLocal)), ro, cts.Token));
        using var dst = new NetworkStream(qemuDst, ownsSocket: true);
        var delivered = new MemoryStream();
        await dst.CopyToAsync(delivered, cts.Token);
        qemuDst.Shutdown(SocketShutdown.Send);
        var (sent, received) = (await send, await receive);
        Assert.Equal(bytes, delivered.ToArray());
        Assert.Equal(("plain", "plain"), (sent.Mode, received.Mode));
    }

    [Fact]
    public async Task A_longer_idle_timeout_restarts_a_read_already_waiting()
    {
        var (a, b) = await WireTests.Pair();
        using var sa = new NetworkStream(a, ownsSocket: true);
        using var reader = new FrameReader(new NetworkStream(b, ownsSocket: true), TimeSpan.FromMilliseconds(400));
        var read = reader.ReadAsync(CancellationToken.None).AsTask();
        await Task.Delay(150);
        reader.IdleTimeout = Timeout.InfiniteTimeSpan;
        await Task.Delay(800);
        Assert.False(read.IsCompleted, $"the read gave up: {read.Exception?.InnerException?.Message}");
        using var writer = new FrameWriter(sa, CompressionMode.None, 1);
        await writer.WriteAsync(FrameType.Tunnel, "late"u8.ToArray(), compress: false, CancellationToken.None);
        await writer.FlushAsync(CancellationToken.None);
        var frame = await read.WaitAsync(TimeSpan.FromSeconds(5));
        Assert.Equal("late"u8.ToArray(), frame!.Value.Payload.ToArray());
    }

    [Fact]
    public async Task Peer_sockets_probe_a_silent_peer_and_give_up_on_a_vanished_one_within_90_s()
    {
        var (a, b) = await WireTests.TcpPair();
        using (a)
        using (b)
        {
            // As bfmigd hands it over: by descriptor, the socket knowing only its family.
            using var passed = new Socket(new SafeSocketHandle(a.Handle, ownsHandle: false));
            PeerSockets.KeepAlive(passed);
            Assert.Equal(1, (int)a.GetSocketOption(SocketOptionLevel.Socket, SocketOptionName.KeepAlive)!);
            int idle = (int)a.GetSocketOption(SocketOptionLevel.Tcp, SocketOptionName.TcpKeepAliveTime)!;
            int interval = (int)a.GetSocketOption(SocketOptionLevel.Tcp, SocketOptionName.TcpKeepAliveInterval)!;
            int probes = (int)a.GetSocketOption(SocketOptionLevel.Tcp, SocketOptionName.TcpKeepAliveRetryCount)!;
            Assert.Equal(90, idle + interval * probes);
            Assert.Equal(0, (int)b.GetSocketOption(SocketOptionLevel.Socket, SocketOptionName.KeepAlive)!);
        }
        // A unix socket pair has no keepalive to set, and is left alone.
        var (u, v) = await WireTests.Pair();
        using (u)
        using (v)
            PeerSockets.KeepAlive(u);
    }

    [Fact]
    public void A_quiet_hello_round_trips_and_must_be_a_plain_memory_stream()
    {
        var hello = new Hello(StreamKind.Mig, false, Guest, 0, new byte[16], 0, new byte[32], "hostA") { QuietChannel = true };
        var bytes = hello.Encode();
        Assert.True(Hello.Decode(bytes).QuietChannel);
        bytes[7] |= 1; // and wants a store
        Assert.Contains("quiet channel that is not a plain memory stream", Assert.Throws<PeerProtocolException>(() => Hello.Decode(bytes)).Message);
        var disk = new Hello(StreamKind.Nbd, false, Guest, 0, new byte[16], 0, new byte[32], "hostA") { QuietChannel = true }.Encode();
        Assert.Contains("(kind 2, flags 0x10)", Assert.Throws<PeerProtocolException>(() => Hello.Decode(disk)).Message);
        // No sender before version 10 sets the flag: such a hello is malformed, not a quiet channel.
        var older = (hello with { Version = 9 }).Encode();
        Assert.Equal("hello of protocol version 9 marks a quiet channel (version 10 on)", Assert.Throws<PeerProtocolException>(() => Hello.Decode(older)).Message);
    }

    /// <summary>
    /// The helper of a main stream reports it armed for post-copy (bfmigd then tells the guest's
    /// next memory connection it is the preempt channel, with no wait) once QEMU advised post-copy
    /// RAM and iterates, and takes that back as soon as QEMU closes the stream.
    /// </summary>
    [Fact]
    public async Task A_main_stream_is_reported_armed_while_QEMU_iterates_after_a_ram_advise_and_no_longer_once_it_closes()
    {
        await using var trip = await ArmingTrip.StartAsync();
        await trip.Qemu.WriteAsync(ArmingStream(), trip.Token);
        trip.StartSender();
        await UntilAsync(() => trip.Reports.Any(r => r.PostCopyArmed), "the armed report", trip.Token);

        // QEMU gives up mid-iteration (a cancelled migration): the report is taken back.
        trip.QemuSocket.Shutdown(SocketShutdown.Send);
        await UntilAsync(() => !trip.Reports.Last().PostCopyArmed, "the report taken back", trip.Token);
        await trip.EndAsync();
        Assert.True(trip.Reports.Last().Final);
        Assert.False(trip.Reports.Last().PostCopyArmed);
    }

    /// <summary>
    /// A QEMU that hung up before the helper read its arming bytes never had a preempt channel
    /// to come: the stream is not reported armed at all, not even until the watcher's first look.
    /// </summary>
    [Fact]
    public async Task A_main_stream_whose_QEMU_hung_up_before_its_arming_bytes_were_read_is_never_reported_armed()
    {
        await using var trip = await ArmingTrip.StartAsync();
        await trip.Qemu.WriteAsync(ArmingStream(), trip.Token);
        trip.QemuSocket.Shutdown(SocketShutdown.Send);
        trip.StartSender();
        await trip.EndAsync();
        Assert.True(trip.Reports.Last().Final);
        Assert.DoesNotContain(trip.Reports, r => r.PostCopyArmed);
    }

    /// <summary>
    /// QEMU hangs up while the helper's forward loop is held (here by a destination that does not
    /// read, as by pacing on a slow link) with QEMU's last bytes unread: the watcher takes the
    /// report back within its period, long before the loop could read the end.
    /// </summary>
    [Fact]
    public async Task An_armed_stream_whose_forward_loop_is_held_is_disarmed_when_QEMU_hangs_up()
    {
        await using var trip = await ArmingTrip.StartAsync(drainDestination: false);
        var writing = trip.Qemu.WriteAsync(ArmingStream(pages: 8192, Random.Shared), trip.Token).AsTask(); // 32 MiB: more than every buffer on the way holds
        trip.StartSender();
        await UntilAsync(() => trip.Reports.Any(r => r.PostCopyArmed), "the armed report", trip.Token);
        await Task.Delay(300, trip.Token);
        Assert.False(writing.IsCompleted, "the sender read all of QEMU's stream: it was not held");

        trip.QemuSocket.Shutdown(SocketShutdown.Both);
        await UntilAsync(() => !trip.Reports.Last().PostCopyArmed, "the report taken back", trip.Token);
        Assert.False(trip.Reports.Last().Final); // taken back by the watcher, before the stream ended
        await writing.ContinueWith(_ => { }, TaskScheduler.Default); // QEMU's write, cut short
        trip.DrainDestination();
        await trip.EndAsync();
        Assert.False(trip.Reports.Last().PostCopyArmed);
    }

    // A stream that advises post-copy RAM and begins an iteration, and goes on (no device state).
    private static byte[] ArmingStream(int pages = 1, Random? incompressible = null)
    {
        var b = new StreamBuilder().Header()
            .U8(Memory.QemuFormat.Command).Be16(Memory.QemuFormat.CmdPostcopyAdvise).Be16(Memory.QemuFormat.PostcopyAdviseRamLength).Bytes(new byte[16])
            .RamStart(("pc.ram", (pages + 8) * 4096L))
            .Part();
        var page = Enumerable.Range(0, 4096).Select(i => (byte)(i * 13 + 5)).ToArray();
        for (int i = 0; i < pages; i++)
        {
            incompressible?.NextBytes(page);
            b.Page(0, i + 1, page);
        }
        return b.Eos().Footer().ToArray();
    }

    /// <summary>A real sending and receiving helper between two QEMU stand-ins, the sender's reports recorded.</summary>
    private sealed class ArmingTrip : IAsyncDisposable
    {
        private readonly TempDir _a = new(), _b = new();
        private readonly CancellationTokenSource _cts = new(TimeSpan.FromSeconds(30));
        private readonly List<IDisposable> _sockets = [];
        private LocalConnection? _senderLocal;
        private Socket? _senderPeer;
        private Task _send = Task.CompletedTask, _receive = Task.CompletedTask, _drain = Task.CompletedTask;
        private NetworkStream _dst = null!;

        public System.Collections.Concurrent.ConcurrentQueue<TransferProgress> Reports { get; } = new();
        public Socket QemuSocket { get; private set; } = null!;
        public NetworkStream Qemu { get; private set; } = null!;
        public CancellationToken Token => _cts.Token;

        public static async Task<ArmingTrip> StartAsync(bool drainDestination = true)
        {
            var t = new ArmingTrip();
            try
            {
                var (qemuSrc, senderLocal) = await t.Pair();
                (t._senderPeer, var receiverPeer) = await t.Pair();
                var (receiverLocal, qemuDst) = await t.Pair();
                t.QemuSocket = qemuSrc;
                t._senderLocal = LocalConnection.FromSocket(senderLocal);
                var ro = new TransferOptions { Guest = Guest, StoreRoot = t._b.Path, IdleTimeout = TimeSpan.FromSeconds(10), EndTimeout = TimeSpan.FromSeconds(5) };
                t._receive = Task.Run(() => TransferRunner.ReceiveAsync(receiverPeer, _ => Task.FromResult(LocalConnection.FromSocket(receiverLocal)), ro, t.Token));
                t._dst = new NetworkStream(qemuDst, ownsSocket: true);
                t._sockets.Add(t._dst);
                if (drainDestination) t.DrainDestination();
                t.Qemu = new NetworkStream(qemuSrc, ownsSocket: true);
                t._sockets.Add(t.Qemu);
                return t;
            }
            catch
            {
                await t.DisposeAsync();
                throw;
            }
        }

        private async Task<(Socket, Socket)> Pair()
        {
            var (x, y) = await WireTests.Pair();
            _sockets.Add(x);
            _sockets.Add(y);
            return (x, y);
        }

        /// <summary>The destination QEMU's stand-in reads (and drops) what reaches it.</summary>
        public void DrainDestination() => _drain = _dst.CopyToAsync(Stream.Null, Token);

        public void StartSender()
        {
            var so = new TransferOptions
            {
                Guest = Guest, StoreRoot = _a.Path, PeerName = "hostB", IdleTimeout = TimeSpan.FromSeconds(10), EndTimeout = TimeSpan.FromSeconds(5),
                Progress = Reports.Enqueue, ProgressInterval = TimeSpan.FromMinutes(5), // only the out-of-turn reports, and the last
            };
            _send = Task.Run(() => TransferRunner.SendAsync(_senderLocal!, _senderPeer!, so, Token));
        }

        /// <summary>QEMU cut the stream after its arming bytes, before its device state: the sender read them, failed, and its final report is in.</summary>
        public async Task EndAsync()
        {
            var e = await Assert.ThrowsAnyAsync<Exception>(() => _send);
            Assert.IsType<StreamCutException>(e);
            await _cts.CancelAsync();
            await Task.WhenAll(_receive, _drain).ContinueWith(_ => { }, TaskScheduler.Default).WaitAsync(TimeSpan.FromSeconds(10));
        }

        public async ValueTask DisposeAsync()
        {
            await _cts.CancelAsync();
            await Task.WhenAll(_send, _receive, _drain).ContinueWith(_ => { }, TaskScheduler.Default).WaitAsync(TimeSpan.FromSeconds(10));
            if (_senderLocal is not null) await _senderLocal.DisposeAsync();
            foreach (var s in _sockets) s.Dispose();
            _cts.Dispose();
            _a.Dispose();
            _b.Dispose();
        }
    }

    private static async Task UntilAsync(Func<bool> condition, string what, CancellationToken ct)
    {
        while (!condition())
        {
            Assert.False(ct.IsCancellationRequested, $"timed out waiting for {what}");
            await Task.Delay(10, CancellationToken.None);
        }
    }
}
