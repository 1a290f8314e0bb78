using System.Net.Sockets;
using BFMig.Transfer.Memory;
using BFMig.Transfer.Wire;

namespace BFMig.Transfer.Tests;

/// <summary>
/// Pacing of memory streams (<see cref="StreamPacer"/>) and the end of a trip: the sender stays
/// within a window of what a slow destination QEMU has taken, and the receiver's commit no longer
/// stands between the checked end frame and QEMU.
/// </summary>
public class PacingTests
{
    private const int Pages = 12 << 8; // 12 MiB of random memory
    private const int DestinationBytesPerSecond = 24 << 20;

    private sealed record Trip(byte[] Delivered, TransferStats Send, TransferStats Receive, long MaxBacklog);

    private static byte[] Stream(int seed)
    {
        var r = new Random(seed);
        var pages = Enumerable.Range(0, Pages).Select(_ =>
        {
            var p = new byte[4096];
            r.NextBytes(p);
            return p;
        }).ToArray();
        return StreamBuilder.FullStream([("pc.ram", pages)]);
    }

    // Source "QEMU" writes in 64 KiB pieces; destination "QEMU" reads at a fixed, slow rate.
    // Backlog = what the source has handed over minus what the destination has read, sampled
    // after every piece the source wrote: stream bytes the destination must still load.
    private static async Task<Trip> Run(byte[] stream, string senderRoot, string receiverRoot, Guid guest, bool pacing)
    {
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(90));
        var (qemuSrc, senderLocal) = await WireTests.Pair();
        var (senderPeer, receiverPeer) = await WireTests.Pair();
        var (receiverLocal, qemuDst) = await WireTests.Pair();
        var so = new TransferOptions
        {
            StoreRoot = senderRoot, Guest = guest, PeerName = "b", Compression = CompressionMode.Zstd, Pacing = pacing,
            IdleTimeout = TimeSpan.FromSeconds(20), EndTimeout = TimeSpan.FromSeconds(10),
        };
        var ro = new TransferOptions { StoreRoot = receiverRoot, Guest = guest, IdleTimeout = TimeSpan.FromSeconds(20), EndTimeout = TimeSpan.FromSeconds(10) };
        var send = Task.Run(() => TransferRunner.SendAsync(LocalConnection.FromSocket(senderLocal), senderPeer, so, cts.Token));
        var receive = Task.Run(() => TransferRunner.ReceiveAsync(receiverPeer, _ => Task.FromResult(LocalConnection.FromSocket(receiverLocal)), ro, cts.Token));
        long written = 0, read = 0, maxBacklog = 0;
        var src = Task.Run(async () =>
        {
            using var s = new NetworkStream(qemuSrc, true);
            for (int at = 0; at < stream.Length; at += 64 << 10)
            {
                int n = Math.Min(64 << 10, stream.Length - at);
                await s.WriteAsync(stream.AsMemory(at, n), cts.Token);
                written += n;
                maxBacklog = Math.Max(maxBacklog, written - Interlocked.Read(ref read));
            }
            qemuSrc.Shutdown(SocketShutdown.Send);
            await s.CopyToAsync(System.IO.Stream.Null, cts.Token);
        });
        var delivered = new MemoryStream();
        var dst = Task.Run(async () =>
        {
            using var s = new NetworkStream(qemuDst, true);
            var buffer = new byte[64 << 10];
            var clock = System.Diagnostics.Stopwatch.StartNew();
            while (true)
            {
                int n = await s.ReadAsync(buffer, cts.Token);
                if (n == 0) break;
                delivered.Write(buffer, 0, n);
                long total = Interlocked.Add(ref read, n);
                var due = TimeSpan.FromSeconds((double)total / DestinationBytesPerSecond) - clock.Elapsed;
                if (due > TimeSpan.Zero) await Task.Delay(due, cts.Token);
            }
        });
        var ss = await send;
        senderLocal.Dispose();
        var rs = await receive;
        receiverLocal.Dispose();
        await Task.WhenAll(src, dst).WaitAsync(TimeSpan.FromSeconds(30));
        return new Trip(delivered.ToArray(), ss, rs, maxBacklog);
    }

    [Fact]
    public async Task A_paced_return_trip_stays_within_a_window_of_a_slow_destination_and_an_unpaced_one_does_not()
    {
        var stream = Stream(7);
        using var a = new TempDir();
        using var b = new TempDir();
        var guest = Guid.NewGuid();
        // First trip A -> B fills both stores; the way back then elides every page, so the wire is
        // no brake at all and only pacing can keep the sender near the destination.
        var first = await Run(stream, a.Path, b.Path, guest, pacing: true);
        Assert.Equal(stream, first.Delivered);
        var back = await Run(stream, b.Path, a.Path, guest, pacing: true);
        Assert.Equal(stream, back.Delivered);
        Assert.Equal("store-match", back.Send.Mode);
        Assert.Equal(Pages, back.Receive.PagesElided);
        Assert.True(back.Send.PacedWaits > 0, "the sender never waited for the destination");
        // Window (at this rate the minimum, 2 MiB) + the receiver's report step and output piece + socket buffers.
        Assert.True(back.MaxBacklog < 6L << 20, $"paced: the destination was {back.MaxBacklog} stream bytes behind");
        Assert.True(back.Send.Committed && back.Receive.Committed);

        var unpaced = await Run(stream, a.Path, b.Path, guest, pacing: false);
        Assert.Equal(stream, unpaced.Delivered);
        Assert.Equal("store-match", unpaced.Send.Mode);
        Assert.Equal(0, unpaced.Send.PacedWaits);
        Assert.True(unpaced.MaxBacklog > 8L << 20, $"unpaced: the destination was only {unpaced.MaxBacklog} stream bytes behind (the control shows nothing)");
    }

    [Fact]
    public async Task Pacer_window_follows_the_delivery_rate_and_wakes_a_waiting_sender()
    {
        var clock = new ManualTime(); // rates and round trips come out the same on any machine
        var pacer = new StreamPacer(TimeSpan.FromSeconds(5), clock);
        Assert.Equal(StreamPacer.MinWindow, pacer.Window);
        Assert.False(pacer.MustWait(StreamPacer.MinWindow, zeroPages: 0));
        Assert.True(pacer.MustWait(StreamPacer.MinWindow + 1, zeroPages: 0));

        // 64 MiB delivered in 100 ms: 671 MB/s x (100 ms round trip + 30 ms), well above the minimum.
        pacer.Sent(64L << 20, zeroPages: 0);
        clock.Advance(TimeSpan.FromMilliseconds(100));
        pacer.OnProgress(64L << 20);
        Assert.InRange(pacer.Window, 80_000_000, 90_000_000);

        long at = pacer.Delivered + pacer.Window + (1 << 20);
        Assert.True(pacer.MustWait(at, zeroPages: 0));
        var wait = pacer.WaitForRoomAsync(at, zeroPages: 0, default);
        Assert.False(wait.IsCompleted);
        pacer.OnProgress(pacer.Delivered + (2 << 20));
        await wait.WaitAsync(TimeSpan.FromSeconds(5));
        Assert.Equal(1, pacer.Waits);
        Assert.Throws<PeerProtocolException>(() => pacer.OnProgress(1));
    }

    // A guest's unused memory reaches the destination as a run of zero pages, loaded at GB/s of
    // load; the pages after it cross the link at its own rate. Timed as one kind, the zero pages'
    // rate opened the window for the pages after them (100 Mbit/s return trips paused with
    // hundreds of ms still on the link), or the pages' rate held the zero pages back for seconds.
    [Fact]
    public void The_pacer_times_stream_bytes_and_zero_pages_each_at_their_own_rate()
    {
        var clock = new ManualTime(); // rates and round trips come out the same on any machine
        var pacer = new StreamPacer(TimeSpan.FromSeconds(5), clock);
        long bytes = 0, zeros = 0;
        void Deliver(long moreBytes, long moreZeros)
        {
            (bytes, zeros) = (bytes + moreBytes, zeros + moreZeros);
            pacer.Sent(bytes, zeros);
            clock.Advance(TimeSpan.FromMilliseconds(60)); // a 60 ms round trip; each report closes a rate sample
            pacer.OnProgress(ProgressMessage.Load(bytes, zeros));
        }
        for (int i = 0; i < 3; i++)
            Deliver(512 << 10, 0); // stream bytes at 8.7 MB/s
        Deliver(9 * 65536, 65536); // 256 MiB of load: 65,536 zero pages at 1.1 M/s

        Assert.True(pacer.MustWait(bytes + (16 << 20), zeros),
            $"16 MiB of stream bytes in flight at 8.7 MB/s, and the sender need not wait (window {pacer.Window})");
        Assert.False(pacer.MustWait(bytes + 16_000 * 9, zeros + 16_000),
            "16,000 zero pages in flight, taken at 1.1 M/s, and the sender must wait as if each were a page of stream bytes");
        Assert.True(pacer.MustWait(bytes, zeros + ((StreamPacer.MaxWindow >> 12) + 1)), "more than the largest window in flight");

        // A report inside one frame of zero pages counts its share of them: counted as stream
        // bytes (2 MB in 60 ms), they would raise the byte rate enough to let 1 MiB more go.
        pacer.Sent(bytes + 9 * 1000, zeros + 1000);
        clock.Advance(TimeSpan.FromMilliseconds(60));
        pacer.OnProgress(ProgressMessage.Load(bytes + 9 * 500, zeros + 500));
        Assert.True(pacer.MustWait(bytes + 9 * 1000 + (1 << 20), zeros + 1000),
            $"half a frame of zero pages was counted as stream bytes: the window is {pacer.Window}");
    }

    // Zero pages are a few bytes of the stream each but a page of work for the destination QEMU:
    // paced by bytes, this whole stream (under 1 MiB) fits in the smallest window and the sender
    // never waits; paced by load (128 MiB of zero pages) it must wait, and nothing stalls.
    [Fact]
    public async Task The_pacer_counts_zero_pages_as_pages_and_the_stream_still_completes()
    {
        var r = new Random(11);
        var pages = Enumerable.Range(0, 32 << 10).Select(i =>
        {
            var p = new byte[4096];
            if (i % 512 == 0) r.NextBytes(p);
            return p;
        }).ToArray();
        var stream = StreamBuilder.FullStream([("pc.ram", pages)]);
        Assert.True(stream.Length < StreamPacer.MinWindow / 2, $"the stream is {stream.Length} bytes");
        using var a = new TempDir();
        using var b = new TempDir();
        var trip = await Run(stream, a.Path, b.Path, Guid.NewGuid(), pacing: true);
        Assert.Equal(stream, trip.Delivered);
        Assert.True(trip.Send.PacedWaits > 0, "the sender never waited: zero pages were paced as their bytes");
        Assert.Equal((32 << 10) - 64, trip.Receive.ZeroPages);
        Assert.True(trip.Send.Committed && trip.Receive.Committed);
    }

    [Fact]
    public async Task A_sender_waiting_on_a_silent_receiver_times_out_naming_the_stall()
    {
        var pacer = new StreamPacer(TimeSpan.FromMilliseconds(200));
        var e = await Assert.ThrowsAsync<TimeoutException>(() => pacer.WaitForRoomAsync(StreamPacer.MinWindow * 2, zeroPages: 0, default));
        Assert.Contains("no progress", e.Message);
    }

    [Fact]
    public void Hello_carries_the_paced_flag_and_progress_frames_are_checked()
    {
        var h = new Hello(StreamKind.Mig, true, Guid.NewGuid(), 1, new byte[16], 2, new byte[32], "a") { Paced = true };
        var d = Hello.Decode(h.Encode());
        Assert.True(d.Paced);
        Assert.True(d.WantsStore);
        Assert.False(Hello.Decode((h with { Paced = false }).Encode()).Paced);
        var p = new byte[ProgressMessage.Length];
        new ProgressMessage(123456789).Encode(p);
        Assert.Equal(123456789, ProgressMessage.Decode(p).Delivered);
        Assert.Contains("expected 8", Assert.Throws<PeerProtocolException>(() => ProgressMessage.Decode(p.AsSpan(1))).Message);
        p[0] = 0x80;
        Assert.Contains("claims", Assert.Throws<PeerProtocolException>(() => ProgressMessage.Decode(p)).Message);
    }

    [Fact]
    public void After_the_end_frame_the_decoder_refuses_ops_that_touch_the_store()
    {
        var decoder = new MigDecoder(null, keep: false, seed: 1, new TransferStats());
        decoder.Seal();
        byte[] raw = [MigOps.Raw, 0, 0, 0, 2, 0xaa, 0xbb];
        Assert.Equal(raw.Length, decoder.Process(raw, 0));
        Assert.Equal([0xaa, 0xbb], decoder.Output.ToArray());
        byte[] elide = [MigOps.ElideRun, 1];
        Assert.Contains("after the end frame", Assert.Throws<PeerProtocolException>(() => decoder.Process(elide, 0)).Message);
        byte[] blocks = [MigOps.Blocks, 1, 1, (byte)'x', 0x80, 0x20];
        Assert.Contains("after the end frame", Assert.Throws<PeerProtocolException>(() => decoder.Process(blocks, 0)).Message);
    }

    [Fact]
    public void Parent_pid_is_read_from_proc()
    {
        var status = File.ReadAllLines("/proc/self/status").First(l => l.StartsWith("PPid:", StringComparison.Ordinal));
        Assert.Equal(int.Parse(status[5..].Trim(), System.Globalization.CultureInfo.InvariantCulture), ParentWatch.ParentPid());
    }
}
