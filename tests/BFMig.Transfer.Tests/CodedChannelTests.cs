using System.Net.Sockets;
using BFMig.Transfer.Memory;
using BFMig.Transfer.Wire;

namespace BFMig.Transfer.Tests;

/// <summary>
/// A multifd migration through real helpers in process, over unix sockets: the main stream and
/// two channels, each its own sending and receiving <see cref="TransferRunner"/>, the channels
/// coded through their main stream helper's <see cref="ChannelCodecService"/>. Checks that every
/// connection reaches the destination byte for byte, that a return trip elides the channels'
/// unchanged pages, and that both stores commit the same content.
/// </summary>
public class CodedChannelTests
{
    private const int PageCount = 256;
    private const string Ram = "pc.ram";
    private static readonly Guid SourceUuid = Guid.Parse("0f3c1d2e-4b5a-6978-8a9b-acbdcedf0102");

    private static byte[][] RandomPages(int seed)
    {
        var rng = new Random(seed);
        return Enumerable.Range(0, PageCount).Select(_ => { var p = new byte[4096]; rng.NextBytes(p); return p; }).ToArray();
    }

    /// <summary>The main stream of a multifd migration: block list, sync points, device state; no page (QEMU 10.0 sends them all on channels).</summary>
    private static byte[] MainStream() =>
        new StreamBuilder().Header().RamStart((Ram, PageCount * 4096L)).Part().Eos().Footer().End().Eos().Footer().DeviceStateAndEof().ToArray();

    /// <summary>Channel <paramref name="id"/>: the setup's SYNC, then <paramref name="pages"/> of <paramref name="guest"/> in packets of 16, then a final SYNC.</summary>
    private static byte[] Channel(byte id, byte[][] guest, IEnumerable<int> pages)
    {
        var b = new MemoryStream();
        b.Write(new MultifdInit(id, SourceUuid).Encode());
        b.Write(new MultifdPacket(MultifdFormat.FlagSync, 0, "", [], []).EncodeHeader());
        ulong number = 1;
        foreach (var chunk in pages.Chunk(16))
        {
            b.Write(new MultifdPacket(0, number++, Ram, chunk.Select(p => (ulong)p << 12).ToArray(), []).EncodeHeader());
            foreach (int p in chunk) b.Write(guest[p]);
        }
        b.Write(new MultifdPacket(MultifdFormat.FlagSync, number, "", [], []).EncodeHeader());
        return b.ToArray();
    }

    private sealed record Connection(byte[] Delivered, TransferStats? Send, TransferStats? Receive, Exception? SendError, Exception? ReceiveError);

    /// <summary>Runs one connection: a "source QEMU" writing <paramref name="stream"/> and a "destination QEMU" reading all.</summary>
    private static async Task<Connection> Carry(byte[] stream, string senderRoot, string receiverRoot, Guid guest, CancellationToken ct, TimeSpan startAfter,
        int holdAt = -1, Task? release = null, Task? closeAfter = null, TaskCompletionSource? delivered = null)
    {
        await Task.Delay(startAfter, ct);
        var (qemuSrc, senderLocal) = await WireTests.Pair();
        var (senderPeer, receiverPeer) = await WireTests.Pair();
        var (receiverLocal, qemuDst) = await WireTests.Pair();
        var so = new TransferOptions { Kind = StreamKind.Mig, StoreRoot = senderRoot, Guest = guest, PeerName = "hostB", Compression = CompressionMode.Zstd, IdleTimeout = TimeSpan.FromSeconds(20), EndTimeout = TimeSpan.FromSeconds(20) };
        var ro = new TransferOptions { Kind = StreamKind.Mig, StoreRoot = receiverRoot, Guest = guest, IdleTimeout = TimeSpan.FromSeconds(20), EndTimeout = TimeSpan.FromSeconds(20) };
        var send = Task.Run(() => TransferRunner.SendAsync(LocalConnection.FromSocket(senderLocal), senderPeer, so, ct));
        var receive = Task.Run(() => TransferRunner.ReceiveAsync(receiverPeer, _ => Task.FromResult(LocalConnection.FromSocket(receiverLocal)), ro, ct));
        var src = Task.Run(async () =>
        {
            using var s = new NetworkStream(qemuSrc, true);
            // As QEMU does, the main stream's last sync point and device state wait for the channels.
            int head = holdAt < 0 ? stream.Length : holdAt;
            await s.WriteAsync(stream.AsMemory(0, head), ct);
            if (release is not null) await release.WaitAsync(ct);
            await s.WriteAsync(stream.AsMemory(head), ct);
            // A source QEMU closes its channels only once the migration completed (closeAfter).
            if (closeAfter is not null) await closeAfter.WaitAsync(ct);
            qemuSrc.Shutdown(SocketShutdown.Send);
            await s.CopyToAsync(Stream.Null, ct);
        });
        var received = new MemoryStream();
        var dst = Task.Run(async () =>
        {
            using var s = new NetworkStream(qemuDst, true);
            var buffer = new byte[64 << 10];
            int n;
            while ((n = await s.ReadAsync(buffer, ct)) > 0)
            {
                received.Write(buffer, 0, n);
                if (received.Length == stream.Length) delivered?.TrySetResult();
            }
        });
        TransferStats? ss = null, rs = null;
        Exception? se = null, re = null;
        try { ss = await send; } catch (Exception e) { se = e; }
        senderLocal.Dispose();
        try { rs = await receive; } catch (Exception e) { re = e; }
        receiverLocal.Dispose();
        await Task.WhenAll(src, dst).WaitAsync(TimeSpan.FromSeconds(20), ct).ContinueWith(_ => { }, TaskScheduler.Default);
        return new Connection(received.ToArray(), ss, rs, se, re);
    }

    /// <summary>
    /// One migration, in QEMU's order: the main stream first, its two channels a moment later; the
    /// main stream's last sync point and device state once the destination has every channel's
    /// pages; the channels closed only once the destination has the whole main stream (so the
    /// main helpers reach End while the channels are still open, and commit after they close).
    /// </summary>
    private static async Task<Connection[]> Migrate(string from, string to, Guid guest, byte[][] memory, int[] channel0, int[] channel1)
    {
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(90));
        var streams = new[] { MainStream(), Channel(0, memory, channel0), Channel(1, memory, channel1) };
        var arrived = streams.Select(_ => new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously)).ToArray();
        var channels = streams.Skip(1).Select((s, i) => Carry(s, from, to, guest, cts.Token, TimeSpan.FromMilliseconds(20 * (i + 1)),
            closeAfter: arrived[0].Task, delivered: arrived[i + 1])).ToArray();
        int head = new StreamBuilder().Header().RamStart((Ram, PageCount * 4096L)).ToArray().Length;
        var main = Carry(streams[0], from, to, guest, cts.Token, TimeSpan.Zero, head, Task.WhenAll(arrived[1].Task, arrived[2].Task), delivered: arrived[0]);
        var results = await Task.WhenAll([main, .. channels]);
        string Describe(Connection c) => $"send {c.Send?.Mode} e{c.Send?.PagesElided} f{c.Send?.PagesFull} {c.Send?.Multifd} / receive {c.Receive?.Mode} e{c.Receive?.PagesElided} f{c.Receive?.PagesFull} {c.Receive?.Multifd} {c.ReceiveError?.Message}";
        for (int i = 0; i < streams.Length; i++)
        {
            Assert.True(results[i].SendError is null, $"connection {i} sender: {results[i].SendError}; {string.Join(" | ", results.Select(Describe))}");
            Assert.True(results[i].ReceiveError is null, $"connection {i} receiver: {results[i].ReceiveError}");
            Assert.Equal(streams[i], results[i].Delivered);
        }
        return results;
    }

    [Fact]
    public async Task AMultifdReturnTrip_ElidesTheChannelsUnchangedPages_AndBothStoresCommitTheSameContent()
    {
        using var a = new TempDir();
        using var b = new TempDir();
        var guest = Guid.NewGuid();
        var memory = RandomPages(31);
        int[] even = [.. Enumerable.Range(0, PageCount).Where(p => p % 2 == 0)];
        int[] odd = [.. Enumerable.Range(0, PageCount).Where(p => p % 2 == 1)];

        // First trip A -> B: every page travels in full on the channels, and both stores record them.
        var first = await Migrate(a.Path, b.Path, guest, memory, even, odd);
        Assert.All(first, c => Assert.True(c.Send!.Committed || c.Send.Mode == "coded-channel", $"{c.Send.Mode} not committed"));
        Assert.Equal("coded-channel", first[1].Send!.Mode);
        Assert.Equal(PageCount, first[1].Send!.PagesFull + first[2].Send!.PagesFull);

        // Return trip B -> A with 8 pages changed, and the pages crossing to the other channel.
        var back = memory.Select(p => p.ToArray()).ToArray();
        for (int p = 0; p < 8; p++) new Random(p).NextBytes(back[p * 31]);
        var second = await Migrate(b.Path, a.Path, guest, back, odd, even);
        var (ch0, ch1) = (second[1].Send!, second[2].Send!);
        Assert.Equal(PageCount - 8, ch0.PagesElided + ch1.PagesElided);
        Assert.Equal(8, ch0.PagesFull + ch1.PagesFull + ch0.PagesDelta + ch1.PagesDelta);
        Assert.Equal(PageCount - 8, second[1].Receive!.PagesElided + second[2].Receive!.PagesElided);
        long channelBytes = second[1].Delivered.Length + second[2].Delivered.Length;
        long wire = second.Sum(c => c.Send!.WireBytesOut);
        Assert.True(wire < channelBytes / 10, $"{wire} bytes on the wire for {channelBytes} bytes of channels");
        Assert.True(second[0].Send!.Committed);
        Assert.True(second[0].Receive!.Committed);
        using (var sa = MemoryStore.Open(a.Path, guest))
        using (var sb = MemoryStore.Open(b.Path, guest))
        {
            Assert.Equal(sa.State.Digest, sb.State.Digest);
            Assert.Equal(2UL, sa.State.Generation);
            Assert.Equal(sa.Hash(back[31]), sa.GetHash(0, 31));
        }
    }
    /// <summary>
    /// A multifd arrival from a host the receiver never exchanged the guest with (A->B->C->A,
    /// protocol 6): the main stream and the channels code against the receiver's page index (a
    /// channel's ELIDE restores the receiver's departure snapshot, which is what it indexed), the
    /// trip arrives exact with 8 changed pages carried, both stores commit the same digest, and the
    /// next trip's channels elide again.
    /// </summary>
    [Fact]
    public async Task AMultifdArrivalFromAThirdHost_IsExact_AndLeavesBothStoresInStepForTheNextTrip()
    {
        using var a = new TempDir();
        using var b = new TempDir();
        using var c = new TempDir();
        var guest = Guid.NewGuid();
        var memory = RandomPages(47);
        int[] even = [.. Enumerable.Range(0, PageCount).Where(p => p % 2 == 0)];
        int[] odd = [.. Enumerable.Range(0, PageCount).Where(p => p % 2 == 1)];
        await Migrate(a.Path, b.Path, guest, memory, even, odd);
        await Migrate(b.Path, c.Path, guest, memory, odd, even);

        var changed = memory.Select(p => p.ToArray()).ToArray();
        for (int p = 0; p < 8; p++) new Random(100 + p).NextBytes(changed[p * 29]);
        memory = changed;
        var home = await Migrate(c.Path, a.Path, guest, memory, even, odd);
        Assert.Equal("store-index", home[0].Send!.Mode);
        Assert.Equal("store-index", home[0].Receive!.Mode);
        Assert.Equal(PageCount - 8, home[1].Send!.PagesElided + home[2].Send!.PagesElided);
        Assert.Equal(8, home[1].Send!.PagesFull + home[2].Send!.PagesFull);
        Assert.Equal(PageCount - 8, home[1].Receive!.PagesElided + home[2].Receive!.PagesElided);
        Assert.True(home[0].Send!.Committed && home[0].Receive!.Committed);
        using (var sa = MemoryStore.Open(a.Path, guest))
        using (var sc = MemoryStore.Open(c.Path, guest))
        {
            Assert.Equal(sa.State.Digest, sc.State.Digest);
            for (int p = 0; p < PageCount; p++)
                Assert.Equal(sa.Hash(memory[p]), sa.GetHash(0, p));
        }

        var onward = await Migrate(a.Path, c.Path, guest, memory, odd, even);
        Assert.Equal("store-match", onward[0].Send!.Mode);
        Assert.Equal(PageCount, onward[1].Send!.PagesElided + onward[2].Send!.PagesElided);
    }
}
