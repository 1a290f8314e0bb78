using System.Diagnostics;
using System.Net.Sockets;
using System.Net;
using System.Text.Json.Nodes;
using BFMig.Native.Linux;
using BFMig.Tests.Shared.Nbd;
using BFMig.Transfer.Disk.Nbd;
using BFMig.Transfer.Disk;
using BFMig.Transfer.Store;
using BFMig.Transfer.Wire;
using Xunit.Abstractions;
using Xunit;

namespace BFMig.Transfer.Tests.Nbd;

/// <summary>
/// The nbd kind end to end with stores: a real QEMU mirror (blockdev-mirror sync=full, as
/// libvirt's --copy-storage-all) into the sending helper, over loopback TCP to the receiving
/// helper, into a real qemu-nbd serving the image the guest left behind on that host. Trips go
/// back and forth between two "hosts" (two images, two store roots).
/// </summary>
[Collection("qemu")]
public sealed class DiskPathTests(ITestOutputHelper output)
{
    private const ulong Size = 32UL << 20;
    private const string Export = "drive-virtio-disk0";
    private static readonly TimeSpan Timeout = TimeSpan.FromSeconds(180);

    private sealed record Trip(TransferStats Sender, TransferStats Receiver, bool Identical, string CompareOutput);

    private sealed class Host(string name, string image, string? store, string format = "qcow2")
    {
        public string Name { get; } = name;
        public string Image { get; } = image;
        public string? Store { get; } = store;
        public string Format { get; } = format;
    }

    private static readonly Guid Guest = Guid.Parse("6f1c1f0e-8d1e-4b4f-9a37-3c2b1d7e5a10");

    private static string MapOf(Host h) => DiskMapStore.MapPath(h.Store!, Guest, Export);

    private static Dictionary<string, DiskImageSpec> ImagesOf(Host h) => new() { [Export] = new DiskImageSpec(h.Image, h.Format) };

    // What bfmigd does once the source QEMU of a migration stopped: capture the identity of the image it left behind.
    private void Seal(Host h)
    {
        var result = DiskBlockMap.SealIdentity(MapOf(h));
        output.WriteLine($"seal {h.Name}: {result}");
        // A block device's identity stays pending: its next receiver re-hashes it.
        Assert.Equal(DeviceNode.IsBlockDevice(h.Image) ? SealResult.NotAFile : SealResult.Sealed, result);
    }

    private async Task<Trip> RunTripAsync(TempDir dir, Host from, Host to, bool killReceiver = false, string qemu = "qemu-system-x86_64", bool seal = true,
        ResettingProxy? resetServer = null)
    {
        using var cts = new CancellationTokenSource(Timeout);
        var ct = cts.Token;
        string nbdSock = dir.File($"{to.Name}-nbd.sock");
        string qemuSock = dir.File($"{from.Name}-mirror.sock");
        File.Delete(qemuSock);
        await using var nbd = await QemuNbdServer.StartAsync(to.Image, to.Format, nbdSock, ["--cache=none", "--aio=threads", "--discard=unmap", "-x", Export],
            TimeSpan.FromSeconds(20), ct);
        using var peerListener = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        peerListener.Bind(new IPEndPoint(IPAddress.Loopback, 0));
        peerListener.Listen(1);
        using var qemuListener = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        qemuListener.Bind(new UnixDomainSocketEndPoint(qemuSock));
        qemuListener.Listen(1);

        using var receiverCts = CancellationTokenSource.CreateLinkedTokenSource(ct);
        var receiver = Task.Run(async () =>
        {
            var peer = await peerListener.AcceptAsync(receiverCts.Token);
            return await TransferRunner.ReceiveAsync(peer, async t =>
            {
                if (resetServer is not null)
                    return LocalConnection.FromSocket(await resetServer.ConnectAsync(nbdSock, t));
                var s = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
                await s.ConnectAsync(new UnixDomainSocketEndPoint(nbdSock), t);
                return LocalConnection.FromSocket(s);
            }, new TransferOptions { Kind = StreamKind.Nbd, StoreRoot = to.Store, Guest = Guest, LocalName = to.Name, DiskImages = ImagesOf(to) }, receiverCts.Token);
        }, CancellationToken.None);
        var sender = Task.Run(async () =>
        {
            var qemuSocket = await qemuListener.AcceptAsync(ct);
            await using var qemu = LocalConnection.FromSocket(qemuSocket);
            var peer = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
            await peer.ConnectAsync((IPEndPoint)peerListener.LocalEndPoint!, ct);
            return await TransferRunner.SendAsync(qemu, peer, new TransferOptions { Kind = StreamKind.Nbd, StoreRoot = from.Store, Guest = Guest, PeerName = to.Name, LocalName = from.Name, DiskImages = ImagesOf(from) }, ct);
        }, CancellationToken.None);
        var mirror = Mirror.RunAsync(qemu, from.Image, qemuSock, Export, discardUnmap: false, dir.File($"{from.Name}.qmp"), ct, from.Format);

        if (killReceiver)
        {
            // Kill the receiving helper once the retained image is about to change.
            while (!DiskBlockMap.IsInFlux(MapOf(to)))
                await Task.Delay(2, ct);
            await Task.Delay(20, ct);
            await receiverCts.CancelAsync();
            await Assert.ThrowsAnyAsync<Exception>(() => receiver);
            await Assert.ThrowsAnyAsync<Exception>(() => sender);
            await Assert.ThrowsAnyAsync<Exception>(() => mirror);
            return new Trip(new TransferStats(), new TransferStats(), false, "");
        }
        if (resetServer is not null)
        {
            // The destination QEMU goes away mid-mirror (as when libvirt kills it after an abort)
            // with its connection reset, while the source's mirror waits for replies to the writes
            // it has in flight and so sends nothing more: only the receiver can notice.
            await resetServer.ResetAsync(ct);
            var reset = Stopwatch.StartNew();
            var cut = await Assert.ThrowsAnyAsync<Exception>(() => receiver);
            output.WriteLine($"receiver ended {reset.Elapsed.TotalSeconds:F2} s after the reset: {cut.GetType().Name}: {cut.Message}");
            await Assert.ThrowsAnyAsync<Exception>(() => sender);
            await Assert.ThrowsAnyAsync<Exception>(() => mirror);
            output.WriteLine($"sender and mirror ended {reset.Elapsed.TotalSeconds:F2} s after the reset");
            Assert.IsType<StreamCutException>(cut);
            Assert.Contains("local NBD server", cut.Message);
            // Seconds, not the helpers' idle timeout (120 s): libvirt's failure must not wait on us.
            Assert.True(reset.Elapsed < TimeSpan.FromSeconds(20), $"the helpers took {reset.Elapsed.TotalSeconds:F1} s to give up");
            return new Trip(new TransferStats(), new TransferStats(), false, "");
        }
        await mirror;
        var s = await sender.WaitAsync(TimeSpan.FromSeconds(60), ct);
        var r = await receiver.WaitAsync(TimeSpan.FromSeconds(60), ct);
        await nbd.DisposeAsync();
        var (identical, compare) = await Images.CompareAsync(from.Image, to.Image, from.Format);
        output.WriteLine($"{from.Name}->{to.Name}: sender {s.Mode} tunnel {s.StreamBytes} B, wire out {s.WireBytesOut} B, committed {s.Committed}; " +
            $"receiver {r.Mode} committed {r.Committed} refused map: {r.DiskMapRefused ?? "-"}, re-hash: {r.DiskRehash ?? "-"}; {compare.Trim()}");
        if (seal && s.Committed)
            Seal(from);
        return new Trip(s, r, identical, compare);
    }

    private sealed record CliTrip(int SenderExit, int ReceiverExit, JsonNode? Sender, JsonNode? Receiver, bool Identical, string CompareOutput);

    // The same trip through the bfmig-transfer executable (two processes, TCP on loopback).
    private async Task<CliTrip> RunCliTripAsync(TempDir dir, Host from, Host to, bool killReceiver = false)
    {
        using var cts = new CancellationTokenSource(Timeout);
        var ct = cts.Token;
        string exe = Path.Combine(AppContext.BaseDirectory, "bfmig-transfer");
        string nbdSock = dir.File($"{to.Name}-nbd.sock");
        string qemuSock = dir.File($"{from.Name}-mirror.sock");
        string senderStats = dir.File("send.json");
        string receiverStats = dir.File("receive.json");
        File.Delete(qemuSock);
        File.Delete(senderStats);
        File.Delete(receiverStats);
        int port;
        using (var probe = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp))
        {
            probe.Bind(new IPEndPoint(IPAddress.Loopback, 0));
            port = ((IPEndPoint)probe.LocalEndPoint!).Port;
        }
        await using var nbd = await QemuNbdServer.StartAsync(to.Image, "qcow2", nbdSock, ["--cache=none", "--aio=threads", "-x", Export], TimeSpan.FromSeconds(20), ct);
        using var receiver = Start(exe, ["receive", "--kind", "nbd", "--listen", $"tcp:127.0.0.1:{port}", "--connect", $"unix:{nbdSock}", "--guest", Guest.ToString(),
            "--store", to.Store!, "--stats", receiverStats, "--name", to.Name, "--accept-timeout", "120", "--image", $"{Export}=qcow2:{to.Image}"]);
        using var sender = Start(exe, ["send", "--kind", "nbd", "--listen", $"unix:{qemuSock}", "--peer", $"tcp:127.0.0.1:{port}", "--guest", Guest.ToString(),
            "--peer-name", to.Name, "--store", from.Store!, "--stats", senderStats, "--name", from.Name, "--accept-timeout", "120", "--image", $"{Export}=qcow2:{from.Image}"]);
        try
        {
            while (!File.Exists(qemuSock))
            {
                if (sender.HasExited)
                    Assert.Fail("sender exited before listening: " + await sender.StandardError.ReadToEndAsync(ct));
                await Task.Delay(20, ct);
            }
            var mirror = Mirror.RunAsync("qemu-system-x86_64", from.Image, qemuSock, Export, discardUnmap: false, dir.File($"{from.Name}.qmp"), ct);
            if (killReceiver)
            {
                while (!DiskBlockMap.IsInFlux(MapOf(to)))
                    await Task.Delay(2, ct);
                await Task.Delay(20, ct);
                receiver.Kill();
                await Assert.ThrowsAnyAsync<Exception>(() => mirror);
            }
            else
            {
                await mirror;
            }
            await sender.WaitForExitAsync(ct);
            await receiver.WaitForExitAsync(ct);
            output.WriteLine($"sender exit {sender.ExitCode}: {(await sender.StandardError.ReadToEndAsync(ct)).Trim()}");
            output.WriteLine($"receiver exit {receiver.ExitCode}: {(await receiver.StandardError.ReadToEndAsync(ct)).Trim()}");
        }
        finally
        {
            foreach (var p in new[] { sender, receiver })
            {
                if (!p.HasExited)
                    p.Kill();
            }
        }
        await nbd.DisposeAsync();
        var (identical, compare) = await Images.CompareAsync(from.Image, to.Image);
        var s = File.Exists(senderStats) ? JsonNode.Parse(await File.ReadAllTextAsync(senderStats, ct)) : null;
        var r = File.Exists(receiverStats) ? JsonNode.Parse(await File.ReadAllTextAsync(receiverStats, ct)) : null;
        output.WriteLine($"{from.Name}->{to.Name} (cli): sender {s?.ToJsonString()} receiver {r?.ToJsonString()}; {compare.Trim()}");
        if (s?["committed"]?.GetValue<bool>() == true)
            Seal(from);
        return new CliTrip(sender.ExitCode, receiver.ExitCode, s, r, identical, compare);
    }

    private static Process Start(string exe, string[] args)
    {
        var psi = new ProcessStartInfo(exe) { RedirectStandardError = true, RedirectStandardOutput = true, UseShellExecute = false };
        foreach (string a in args)
            psi.ArgumentList.Add(a);
        return Process.Start(psi) ?? throw new InvalidOperationException($"{exe} did not start");
    }

    private async Task AssertMapsAgreeAsync(Host from, Host to)
    {
        Assert.False(DiskBlockMap.IsInFlux(MapOf(from)), "sender's map still in flux");
        Assert.False(DiskBlockMap.IsInFlux(MapOf(to)), "receiver's map still in flux");
        var a = DiskBlockMap.Load(MapOf(from));
        var b = DiskBlockMap.Load(MapOf(to));
        var truth = await DiskBlockMapBuilder.BuildFromImageAsync(from.Image, from.Format, DiskMapStore.BlockSize, a.HashKey);
        Assert.Equal(truth.ComputeDigest(), a.ComputeDigest());
        Assert.Equal(a.ComputeDigest(), b.ComputeDigest());
        Assert.Equal(truth.BlockCount, b.KnownCount);
    }

    private (TempDir Dir, Host A, Host B) Setup()
    {
        var dir = TestEnv.CreateTempDir();
        return (dir, new Host("a", dir.File("a.qcow2"), dir.File("store-a")), new Host("b", dir.File("b.qcow2"), dir.File("store-b")));
    }

    private static List<string> Changes(int count, int salt) =>
        Enumerable.Range(0, count).Select(i => $"write -P 0x{(0x20 + i + salt) & 0xff:x2} {(i * 37 + salt) % 512 * 65536} 64k").ToList();

    [Fact]
    public async Task ThereAndBackAndThereAgainSendsOnlyTheChanges()
    {
        if (!TestEnv.Require(output, "qemu-system-x86_64", "qemu-nbd", "qemu-img", "qemu-io"))
            return;
        var (dir, a, b) = Setup();
        using var _ = dir;
        await Images.CreateRandomQcow2Async(a.Image, Size, seed: 11);
        await Images.CreateAsync(b.Image, Size);

        var first = await RunTripAsync(dir, a, b);
        Assert.True(first.Identical, first.CompareOutput);
        Assert.Equal("store-full", first.Sender.Mode);
        Assert.True(first.Sender.Committed && first.Receiver.Committed);
        Assert.True(first.Sender.StreamBytes >= (long)Size, $"first trip carried {first.Sender.StreamBytes}");
        await AssertMapsAgreeAsync(a, b);

        // The guest runs on B and changes 10 blocks; it returns to A, whose image is what it left behind.
        await Images.IoAsync(b.Image, Changes(10, 3));
        var back = await RunTripAsync(dir, b, a);
        Assert.True(back.Identical, back.CompareOutput);
        Assert.Equal("store-match", back.Sender.Mode);
        Assert.Equal("store-match", back.Receiver.Mode);
        Assert.True(back.Sender.StreamBytes < first.Sender.StreamBytes / 20, $"return trip carried {back.Sender.StreamBytes} of {first.Sender.StreamBytes}");
        Assert.True(back.Sender.WireBytesOut < first.Sender.WireBytesOut / 20, $"return trip wire {back.Sender.WireBytesOut} of {first.Sender.WireBytesOut}");
        Assert.True(back.Sender.StreamBytes >= 10 * 65536, $"10 changed blocks need at least 640 KiB, carried {back.Sender.StreamBytes}");
        await AssertMapsAgreeAsync(b, a);

        // And to B again, into the image it left there, with a discard on the way.
        await Images.IoAsync(a.Image, [.. Changes(6, 101), "discard 20M 1M"]);
        var again = await RunTripAsync(dir, a, b);
        Assert.True(again.Identical, again.CompareOutput);
        Assert.Equal("store-match", again.Sender.Mode);
        Assert.True(again.Sender.StreamBytes < first.Sender.StreamBytes / 20, $"third trip carried {again.Sender.StreamBytes}");
        await AssertMapsAgreeAsync(a, b);
        output.WriteLine($"tunnel bytes: first {first.Sender.StreamBytes}, return {back.Sender.StreamBytes} ({100.0 * back.Sender.StreamBytes / first.Sender.StreamBytes:F2} %), third {again.Sender.StreamBytes}; " +
            $"wire out: {first.Sender.WireBytesOut}, {back.Sender.WireBytesOut}, {again.Sender.WireBytesOut}");
    }

    /// <summary>
    /// The departure image on A is touched between trips by something other than a BFMig mirror
    /// while both maps still agree. Without the identity check the return trip would elide the
    /// blocks A's map claims and leave A's image wrong; with it A refuses its map, everything is
    /// sent, and A ends identical to B.
    /// </summary>
    [Theory]
    [InlineData("qemu-io write")]
    [InlineData("replaced file")]
    [InlineData("resized")]
    [InlineData("identity never captured")]
    public async Task ADepartureImageTouchedBetweenTripsMeansEverythingIsSent(string touch)
    {
        if (!TestEnv.Require(output, "qemu-system-x86_64", "qemu-nbd", "qemu-img", "qemu-io"))
            return;
        var (dir, a, b) = Setup();
        using var _ = dir;
        await Images.CreateRandomQcow2Async(a.Image, Size, seed: 31);
        await Images.CreateAsync(b.Image, Size);
        var first = await RunTripAsync(dir, a, b, seal: touch != "identity never captured");
        Assert.True(first.Identical, first.CompareOutput);
        await AssertMapsAgreeAsync(a, b);
        var kept = DiskBlockMap.Load(MapOf(a)).Identity;
        Assert.NotNull(kept);
        Assert.Equal(Path.GetFullPath(a.Image), kept.Path);
        Assert.Equal(touch == "identity never captured", kept.IsPending);

        switch (touch)
        {
            case "qemu-io write":
                // Blocks the guest does not change on B: a trip trusting A's map would elide them.
                await Images.IoAsync(a.Image, ["write -P 0x5a 1M 128k", "write -P 0xa5 30M 64k"]);
                break;
            case "replaced file":
                string copy = a.Image + ".restored";
                await Images.CopyAsync(a.Image, copy);
                await Images.IoAsync(copy, ["write -P 0x77 4M 64k"]);
                File.Move(copy, a.Image, overwrite: true);
                break;
            case "resized":
                await TestEnv.RunAsync("qemu-img", ["resize", "-q", a.Image, "+1M"]);
                await TestEnv.RunAsync("qemu-img", ["resize", "-q", "--shrink", a.Image, Size.ToString(System.Globalization.CultureInfo.InvariantCulture)]);
                break;
        }
        await Images.IoAsync(b.Image, Changes(3, 5));

        var back = await RunTripAsync(dir, b, a);
        Assert.True(back.Identical, back.CompareOutput);
        Assert.Equal("store-full", back.Receiver.Mode);
        Assert.Equal("store-full", back.Sender.Mode);
        Assert.NotNull(back.Receiver.DiskMapRefused);
        Assert.Contains(touch == "identity never captured" ? "never captured" : "image changed", back.Receiver.DiskMapRefused);
        Assert.True(back.Sender.StreamBytes >= (long)Size, $"trip into a touched image carried only {back.Sender.StreamBytes}");
        await AssertMapsAgreeAsync(b, a);
    }

    /// <summary>
    /// A raw departure image on A is written between trips (its identity changes): A re-hashes it
    /// against its map before the return trip, and only the blocks that really differ, plus the
    /// guest's changes on B, travel; A ends identical to B.
    /// </summary>
    [Fact]
    public async Task ATouchedRawImageIsReHashedAndOnlyWhatDiffersIsSent()
    {
        if (!TestEnv.Require(output, "qemu-system-x86_64", "qemu-nbd", "qemu-img", "qemu-io"))
            return;
        using var dir = TestEnv.CreateTempDir();
        var a = new Host("a", dir.File("a.raw"), dir.File("store-a"), "raw");
        var b = new Host("b", dir.File("b.raw"), dir.File("store-b"), "raw");
        Images.CreateRandomRaw(a.Image, Size, seed: 41);
        await Images.CreateAsync(b.Image, Size, "raw");
        var first = await RunTripAsync(dir, a, b);
        Assert.True(first.Identical, first.CompareOutput);

        // Written outside any trip: two blocks differ from A's map now.
        await Images.IoAsync(a.Image, ["write -P 0x5a 1M 128k"], "raw");
        await Images.IoAsync(b.Image, Changes(3, 5), "raw");
        var back = await RunTripAsync(dir, b, a);
        Assert.True(back.Identical, back.CompareOutput);
        Assert.Equal("store-match", back.Receiver.Mode);
        Assert.Equal("store-match", back.Sender.Mode);
        Assert.Null(back.Receiver.DiskMapRefused);
        Assert.Contains("2 blocks in 1 ranges of", back.Receiver.DiskRehash);
        Assert.True(back.Receiver.DiskRehashBytes >= (long)Size, $"re-hash read {back.Receiver.DiskRehashBytes}");
        Assert.True(back.Sender.StreamBytes < first.Sender.StreamBytes / 20, $"return trip carried {back.Sender.StreamBytes} of {first.Sender.StreamBytes}");
        await AssertMapsAgreeAsync(b, a);
    }

    /// <summary>
    /// Every BFMig process on both hosts was SIGKILLed during a trip B -> A that wrote two blocks
    /// into A's image: both journals stay coarse (whole 8 MiB regions, here the whole image) and
    /// bfmigd never captured A's identity. The retry's receiver re-hashes its image, so only the
    /// two blocks that differ are in doubt (not the journals' regions) and the sender accepts that
    /// exact doubt: the retry carries them and B's changes, not the disk.
    /// </summary>
    [Fact]
    public async Task AfterACrashOnBothHostsTheReHashNotTheCoarseJournalsDecidesWhatIsSent()
    {
        if (!TestEnv.Require(output, "qemu-system-x86_64", "qemu-nbd", "qemu-img", "qemu-io"))
            return;
        using var dir = TestEnv.CreateTempDir();
        var a = new Host("a", dir.File("a.raw"), dir.File("store-a"), "raw");
        var b = new Host("b", dir.File("b.raw"), dir.File("store-b"), "raw");
        Images.CreateRandomRaw(a.Image, Size, seed: 43);
        await Images.CreateAsync(b.Image, Size, "raw");
        var first = await RunTripAsync(dir, a, b);
        Assert.True(first.Identical, first.CompareOutput);
        var back = await RunTripAsync(dir, b, a);
        Assert.True(back.Identical, back.CompareOutput);

        // The crashed trip B -> A: its receiver named A's image pending at the hello, both helpers
        // journaled coarsely before writing, two blocks reached A's image, and nothing settled.
        var mapA = DiskBlockMap.Load(MapOf(a));
        mapA.Identity = DiskImageIdentity.PendingCapture(a.Image, "raw");
        mapA.Save(MapOf(a));
        foreach (var host in new[] { a, b })
        {
            var journal = DiskDoubtJournal.Begin(MapOf(host), DiskMapStore.BlockSize, DiskDoubt.None);
            journal.Touching(0, Size);
            journal.Dispose();
            Assert.True(DiskDoubtJournal.Read(MapOf(host)).BlockCount >= (long)(Size / DiskMapStore.BlockSize));
        }
        await Images.IoAsync(a.Image, ["write -P 0x6c 5M 128k"], "raw");

        await Images.IoAsync(b.Image, Changes(3, 29), "raw");
        var retry = await RunTripAsync(dir, b, a);
        Assert.True(retry.Identical, retry.CompareOutput);
        Assert.Equal("store-match", retry.Receiver.Mode);
        Assert.Equal("store-match", retry.Sender.Mode);
        Assert.Contains("2 blocks in 1 ranges of", retry.Receiver.DiskRehash);
        Assert.Equal(2, retry.Receiver.DiskDoubtBlocks);
        Assert.Equal(2, retry.Sender.DiskDoubtBlocks);
        Assert.True(retry.Sender.StreamBytes < first.Sender.StreamBytes / 10, $"retry carried {retry.Sender.StreamBytes} of {first.Sender.StreamBytes}");
        await AssertMapsAgreeAsync(b, a);
    }

    /// <summary>
    /// The guest was started on A while away (bfmigd marks A's map wholly in doubt) and wrote its
    /// raw image: the re-hash proves the rest of the map, and only what the fork wrote travels
    /// back besides B's changes.
    /// </summary>
    [Fact]
    public async Task AMapWhollyInDoubtIsProvenBlockByBlockByAReHash()
    {
        if (!TestEnv.Require(output, "qemu-system-x86_64", "qemu-nbd", "qemu-img", "qemu-io"))
            return;
        using var dir = TestEnv.CreateTempDir();
        var a = new Host("a", dir.File("a.raw"), dir.File("store-a"), "raw");
        var b = new Host("b", dir.File("b.raw"), dir.File("store-b"), "raw");
        Images.CreateRandomRaw(a.Image, Size, seed: 47);
        await Images.CreateAsync(b.Image, Size, "raw");
        var first = await RunTripAsync(dir, a, b);
        Assert.True(first.Identical, first.CompareOutput);

        DiskBlockMap.MarkInFlux(MapOf(a));
        await Images.IoAsync(a.Image, ["write -P 0x33 5M 192k"], "raw");
        await Images.IoAsync(b.Image, Changes(3, 7), "raw");
        var back = await RunTripAsync(dir, b, a);
        Assert.True(back.Identical, back.CompareOutput);
        Assert.Equal("store-match", back.Receiver.Mode);
        Assert.Contains("3 blocks in 1 ranges of", back.Receiver.DiskRehash);
        Assert.True(back.Sender.StreamBytes < first.Sender.StreamBytes / 20, $"return trip carried {back.Sender.StreamBytes} of {first.Sender.StreamBytes}");
        await AssertMapsAgreeAsync(b, a);
    }

    /// <summary>
    /// Both hosts' disks are block devices (loop devices): no identity can prove them, so every
    /// arrival re-hashes the retained device; a write to it behind BFMig's back (which no
    /// timestamp shows) is found and sent, and the trips stay cheap and exact.
    /// </summary>
    [Fact]
    public async Task BlockDevicesAreReHashedOnEveryArrivalAndNeverTrustedOnAGuess()
    {
        if (!TestEnv.Require(output, "qemu-system-x86_64", "qemu-nbd", "qemu-img", "qemu-io", "losetup"))
            return;
        if (UnixUsers.EffectiveUid != 0)
        {
            Assert.False(TestEnv.IsCi, "loop devices need root (CI=true: required)");
            output.WriteLine("SKIPPED: loop devices need root");
            return;
        }
        using var dir = TestEnv.CreateTempDir();
        Images.CreateRandomRaw(dir.File("a.raw"), Size, seed: 43);
        await Images.CreateAsync(dir.File("b.raw"), Size, "raw");
        string loopA = (await TestEnv.RunAsync("losetup", ["--find", "--show", dir.File("a.raw")])).Trim();
        string loopB = "";
        try
        {
            loopB = (await TestEnv.RunAsync("losetup", ["--find", "--show", dir.File("b.raw")])).Trim();
            // The sender's bound on the export a peer may declare: the device's size; never read
            // through a link in a directory others may write (the test's, under /tmp).
            Assert.Equal(Size, new DiskImageSpec(loopA, "raw").ReadVirtualSize());
            File.CreateSymbolicLink(dir.File("a.link"), loopA);
            Assert.Null(new DiskImageSpec(dir.File("a.link"), "raw").ReadVirtualSize());
            var a = new Host("a", loopA, dir.File("store-a"), "raw");
            var b = new Host("b", loopB, dir.File("store-b"), "raw");
            var first = await RunTripAsync(dir, a, b);
            Assert.True(first.Identical, first.CompareOutput);
            Assert.Null(first.Receiver.DiskRehash);

            await Images.IoAsync(loopA, ["write -P 0x5a 2M 64k"], "raw");
            await Images.IoAsync(loopB, Changes(3, 5), "raw");
            var back = await RunTripAsync(dir, b, a);
            Assert.True(back.Identical, back.CompareOutput);
            Assert.Equal("store-match", back.Receiver.Mode);
            Assert.Contains("1 blocks in 1 ranges of", back.Receiver.DiskRehash);
            Assert.True(back.Sender.StreamBytes < first.Sender.StreamBytes / 20, $"return trip carried {back.Sender.StreamBytes} of {first.Sender.StreamBytes}");
            await AssertMapsAgreeAsync(b, a);

            await Images.IoAsync(loopA, Changes(2, 9), "raw");
            var again = await RunTripAsync(dir, a, b);
            Assert.True(again.Identical, again.CompareOutput);
            Assert.Equal("store-match", again.Receiver.Mode);
            Assert.Contains("0 blocks in 0 ranges of", again.Receiver.DiskRehash);
            Assert.True(again.Sender.StreamBytes < first.Sender.StreamBytes / 20, $"third trip carried {again.Sender.StreamBytes}");
        }
        finally
        {
            foreach (string loop in new[] { loopA, loopB }.Where(l => l.Length > 0))
                await TestEnv.RunAsync("losetup", ["-d", loop]);
        }
    }

    [Fact]
    public async Task AnUntouchedDepartureImageKeepsElisionAndTheMapNamesIt()
    {
        if (!TestEnv.Require(output, "qemu-system-x86_64", "qemu-nbd", "qemu-img", "qemu-io"))
            return;
        var (dir, a, b) = Setup();
        using var _ = dir;
        await Images.CreateRandomQcow2Async(a.Image, Size, seed: 32);
        await Images.CreateAsync(b.Image, Size);
        var first = await RunTripAsync(dir, a, b);
        Assert.True(first.Identical, first.CompareOutput);
        var sealedIdentity = DiskBlockMap.Load(MapOf(a)).Identity!;
        Assert.False(sealedIdentity.IsPending);
        Assert.Equal(DiskImageIdentity.Capture(a.Image, "qcow2"), sealedIdentity);
        // The receiver's map is only the peer view while its QEMU runs the guest: it names its image, uncaptured.
        Assert.True(DiskBlockMap.Load(MapOf(b)).Identity!.IsPending);

        await Images.IoAsync(b.Image, Changes(4, 8));
        var back = await RunTripAsync(dir, b, a);
        Assert.True(back.Identical, back.CompareOutput);
        Assert.Equal("store-match", back.Receiver.Mode);
        Assert.Null(back.Receiver.DiskMapRefused);
        Assert.True(back.Sender.StreamBytes < first.Sender.StreamBytes / 20, $"return trip carried {back.Sender.StreamBytes} of {first.Sender.StreamBytes}");
        Assert.Equal(first.Sender.DiskMap, MapOf(a));
    }

    [Fact]
    public async Task Qemu10MirrorThereAndBackIntoQemuNbd72()
    {
        if (!TestEnv.Require(output, TestEnv.Qemu10, "qemu-nbd", "qemu-img", "qemu-io"))
            return;
        var (dir, a, b) = Setup();
        using var _ = dir;
        await Images.CreateRandomQcow2Async(a.Image, Size, seed: 16, fillFraction: 0.8);
        await Images.CreateAsync(b.Image, Size);
        var first = await RunTripAsync(dir, a, b, qemu: TestEnv.Qemu10);
        Assert.True(first.Identical, first.CompareOutput);
        await AssertMapsAgreeAsync(a, b);

        await Images.IoAsync(b.Image, [.. Changes(7, 41), "discard 8M 512k"]);
        var back = await RunTripAsync(dir, b, a, qemu: TestEnv.Qemu10);
        Assert.True(back.Identical, back.CompareOutput);
        Assert.Equal("store-match", back.Sender.Mode);
        Assert.True(back.Sender.StreamBytes < first.Sender.StreamBytes / 20, $"return trip carried {back.Sender.StreamBytes} of {first.Sender.StreamBytes}");
        await AssertMapsAgreeAsync(b, a);
    }

    /// <summary>
    /// The receiver's map disagrees with the sender's view of it (here A's map names other content
    /// for block 7, as a map of another trip would): the receiver offers its own map instead
    /// (issue 15), the sender codes against it, block 7 is carried because what A's map names for
    /// it is not what the guest holds, and A ends identical to B.
    /// </summary>
    [Fact]
    public async Task AReceiverMapThatDisagreesWithTheSendersViewIsOfferedAndWhatItDoesNotHoldIsSent()
    {
        if (!TestEnv.Require(output, "qemu-system-x86_64", "qemu-nbd", "qemu-img", "qemu-io"))
            return;
        var (dir, a, b) = Setup();
        using var _ = dir;
        await Images.CreateRandomQcow2Async(a.Image, Size, seed: 12);
        await Images.CreateAsync(b.Image, Size);
        var first = await RunTripAsync(dir, a, b);
        Assert.True(first.Identical, first.CompareOutput);
        await AssertMapsAgreeAsync(a, b);

        var lie = DiskBlockMap.Load(MapOf(a));
        lie.Set(7, UInt128.MaxValue);
        lie.Save(MapOf(a));
        await Images.IoAsync(b.Image, Changes(4, 9));

        var back = await RunTripAsync(dir, b, a);
        Assert.True(back.Identical, back.CompareOutput);
        Assert.Equal("store-index", back.Sender.Mode);
        Assert.Equal("store-index", back.Receiver.Mode);
        Assert.True(back.Sender.StreamBytes >= 5 * 65536, $"block 7 and four changed blocks need 320 KiB, carried {back.Sender.StreamBytes}");
        Assert.True(back.Sender.StreamBytes < first.Sender.StreamBytes / 20, $"carried {back.Sender.StreamBytes} of {first.Sender.StreamBytes}");
        await AssertMapsAgreeAsync(b, a);
    }

    /// <summary>
    /// A guest's disk tours three hosts, A->B->C->A (issue 15). C never exchanged it with A, so C's
    /// view (of B's image) does not match A's map; A offers its own map, C elides every block A
    /// still holds, and A ends identical to C. The next trip between them matches as usual.
    /// </summary>
    [Fact]
    public async Task AnArrivalFromAHostThatNeverSentToThisOneIsCodedAgainstItsOwnMap()
    {
        if (!TestEnv.Require(output, "qemu-system-x86_64", "qemu-nbd", "qemu-img", "qemu-io"))
            return;
        var (dir, a, b) = Setup();
        using var _ = dir;
        var c = new Host("c", dir.File("c.qcow2"), dir.File("store-c"));
        await Images.CreateRandomQcow2Async(a.Image, Size, seed: 21);
        await Images.CreateAsync(b.Image, Size);
        await Images.CreateAsync(c.Image, Size);
        var first = await RunTripAsync(dir, a, b);
        await Images.IoAsync(b.Image, Changes(5, 31));
        var second = await RunTripAsync(dir, b, c);
        Assert.True(first.Identical && second.Identical, first.CompareOutput + second.CompareOutput);
        Assert.Equal("store-full", second.Sender.Mode); // C held nothing of the guest

        await Images.IoAsync(c.Image, Changes(3, 57));
        var home = await RunTripAsync(dir, c, a);
        Assert.True(home.Identical, home.CompareOutput);
        Assert.Equal("store-index", home.Sender.Mode);
        Assert.Equal("store-index", home.Receiver.Mode);
        Assert.True(home.Sender.StreamBytes >= 8 * 65536, $"eight blocks changed since A's snapshot, carried {home.Sender.StreamBytes}");
        Assert.True(home.Sender.StreamBytes < first.Sender.StreamBytes / 20, $"C->A carried {home.Sender.StreamBytes} of the first trip's {first.Sender.StreamBytes}");
        Assert.True(home.Sender.Committed && home.Receiver.Committed);
        await AssertMapsAgreeAsync(c, a);

        var onward = await RunTripAsync(dir, a, c);
        Assert.True(onward.Identical, onward.CompareOutput);
        Assert.Equal("store-match", onward.Sender.Mode);
        output.WriteLine($"tunnel bytes: A->B {first.Sender.StreamBytes}, B->C {second.Sender.StreamBytes}, C->A {home.Sender.StreamBytes}, A->C {onward.Sender.StreamBytes}");
    }

    [Fact]
    public async Task KilledReceiverKeepsWhatItDidNotTouchAndTheRetrySendsOnlyTheRest()
    {
        if (!TestEnv.Require(output, "qemu-system-x86_64", "qemu-nbd", "qemu-img", "qemu-io"))
            return;
        var (dir, a, b) = Setup();
        using var _ = dir;
        await Images.CreateRandomQcow2Async(a.Image, Size, seed: 13);
        await Images.CreateAsync(b.Image, Size);
        var first = await RunTripAsync(dir, a, b);
        Assert.True(first.Identical, first.CompareOutput);
        await AssertMapsAgreeAsync(a, b);

        await Images.IoAsync(b.Image, Changes(8, 17));
        await RunTripAsync(dir, b, a, killReceiver: true);
        Assert.True(DiskBlockMap.IsInFlux(MapOf(a)), "receiver's map has no journal after it was killed");
        Assert.True(DiskBlockMap.IsInFlux(MapOf(b)), "sender's map has no journal after the trip failed");
        Assert.False(DiskDoubtJournal.Read(MapOf(a)).Whole);
        Assert.False(DiskDoubtJournal.Read(MapOf(b)).Whole);
        // The trip wrote A's image: its identity waits for bfmigd, once the trip's NBD server let go.
        Assert.True(DiskBlockMap.Load(MapOf(a)).Identity!.IsPending);
        Seal(a);

        var retry = await RunTripAsync(dir, b, a);
        Assert.True(retry.Identical, retry.CompareOutput);
        Assert.Equal("store-match", retry.Sender.Mode);
        Assert.Equal("store-match", retry.Receiver.Mode);
        Assert.True(retry.Sender.StreamBytes < first.Sender.StreamBytes / 4, $"retry after the kill carried {retry.Sender.StreamBytes} of {first.Sender.StreamBytes}");
        await AssertMapsAgreeAsync(b, a);
        Assert.False(DiskBlockMap.IsInFlux(MapOf(a)));
    }

    /// <summary>
    /// The receiver's store is on a file system with no space left when a return trip starts: the
    /// trip goes through at stock cost (everything sent, the image exact), the receiver removes
    /// its map rather than keep one it cannot journal, and says why.
    /// </summary>
    [Fact]
    public async Task AFullStoreOnTheReceiverCostsAWholeTripNotAFailedOne()
    {
        if (!TestEnv.Require(output, "qemu-system-x86_64", "qemu-nbd", "qemu-img", "qemu-io"))
            return;
        if (Environment.UserName != "root")
        {
            output.WriteLine("skipped: mounting a small tmpfs for the full store needs root");
            return;
        }
        var (dir, a, b) = Setup();
        using var _ = dir;
        Directory.CreateDirectory(b.Store!);
        Assert.Equal(0, await TestEnv.ExitCodeAsync("mount", ["-t", "tmpfs", "-o", "size=1m", "bfmig-full-disk-store", b.Store!]));
        try
        {
            await Images.CreateRandomQcow2Async(a.Image, Size, seed: 37);
            await Images.CreateAsync(b.Image, Size);
            var first = await RunTripAsync(dir, a, b);
            Assert.True(first.Identical, first.CompareOutput);
            await Images.IoAsync(b.Image, Changes(8, 41));
            var back = await RunTripAsync(dir, b, a);
            Assert.True(back.Identical, back.CompareOutput);
            Assert.True(File.Exists(MapOf(b)));

            // Nothing left on B's store: the next arrival there cannot journal its writes.
            await Images.IoAsync(a.Image, Changes(8, 43));
            // dd ends with "No space left on device" (exit 1): that is the point.
            await TestEnv.ExitCodeAsync("dd", ["if=/dev/zero", $"of={Path.Combine(b.Store!, "filler")}", "bs=4k"]);
            var full = await RunTripAsync(dir, a, b, seal: false);
            Assert.True(full.Identical, full.CompareOutput);
            Assert.Equal("store-full", full.Receiver.Mode);
            Assert.Contains("the store cannot be written", full.Receiver.DiskMapUnused);
            Assert.False(full.Receiver.Committed);
            Assert.True(full.Sender.StreamBytes >= (long)Size, $"the trip into the full store carried {full.Sender.StreamBytes} of {Size}");
            Assert.False(File.Exists(MapOf(b)), "the receiver kept a map it could not journal");
        }
        finally
        {
            if (await TestEnv.ExitCodeAsync("umount", [b.Store!]) != 0)
                Assert.Equal(0, await TestEnv.ExitCodeAsync("umount", ["-l", b.Store!]));
        }
    }

    /// <summary>
    /// The destination's NBD server dies mid-trip and its connection is reset: the receiving helper
    /// ends the stream at once (it does not wait for a source that waits for replies), everything
    /// ends within seconds, and the retry still sends only what the dead trip may have touched.
    /// </summary>
    [Fact]
    public async Task ADeadDestinationServerEndsTheTripInSecondsAndTheRetryStaysSmall()
    {
        if (!TestEnv.Require(output, "qemu-system-x86_64", "qemu-nbd", "qemu-img", "qemu-io"))
            return;
        var (dir, a, b) = Setup();
        using var _ = dir;
        await Images.CreateRandomQcow2Async(a.Image, Size, seed: 29);
        await Images.CreateAsync(b.Image, Size);
        var first = await RunTripAsync(dir, a, b);
        Assert.True(first.Identical, first.CompareOutput);

        await Images.IoAsync(b.Image, Changes(8, 31));
        // The handshake and the first write reach the server; the other writes stay in flight.
        await using (var proxy = new ResettingProxy(forwardLimit: 96 << 10))
            await RunTripAsync(dir, b, a, resetServer: proxy);
        Seal(a);

        var retry = await RunTripAsync(dir, b, a);
        Assert.True(retry.Identical, retry.CompareOutput);
        Assert.Equal("store-match", retry.Sender.Mode);
        Assert.True(retry.Sender.StreamBytes < first.Sender.StreamBytes / 4, $"retry after the dead server carried {retry.Sender.StreamBytes} of {first.Sender.StreamBytes}");
        await AssertMapsAgreeAsync(b, a);
    }

    /// <summary>
    /// A failed trip wrote a block into the receiver's image, and the guest then put that block
    /// back to what both saved maps say: without the journal the retry would elide it and leave
    /// the failed trip's content there. Whichever host's journal holds the block (the receiver's,
    /// or only the sender's, as after a receiver whose last writes were never journaled on its
    /// side), the retry sends it.
    /// </summary>
    [Theory]
    [InlineData("receiver")]
    [InlineData("sender")]
    [InlineData("both")]
    public async Task ABlockAFailedTripLeftInDoubtIsSentEvenWhenTheMapsSayItMatches(string journaledBy)
    {
        if (!TestEnv.Require(output, "qemu-system-x86_64", "qemu-nbd", "qemu-img", "qemu-io"))
            return;
        var (dir, a, b) = Setup();
        using var _ = dir;
        await Images.CreateRandomQcow2Async(a.Image, Size, seed: 19);
        await Images.CreateAsync(b.Image, Size);
        var first = await RunTripAsync(dir, a, b);
        Assert.True(first.Identical, first.CompareOutput);

        // The failed trip B -> A: block 40 (and its neighbour) reached A's image, then the trip broke.
        const ulong at = 40UL * 65536;
        await Images.IoAsync(a.Image, [$"write -P 0x6b {at} 128k"]);
        foreach (var (host, journals) in new[] { (a, journaledBy is "receiver" or "both"), (b, journaledBy is "sender" or "both") })
        {
            using var journal = DiskDoubtJournal.Begin(MapOf(host), DiskMapStore.BlockSize, DiskDoubt.None);
            if (journals)
                journal.Touching(at, 128 << 10);
            journal.Settle();
        }
        // What the receiver does at the hello and bfmigd once the trip's QEMU let go.
        var mapA = DiskBlockMap.Load(MapOf(a));
        mapA.Identity = DiskImageIdentity.PendingCapture(a.Image, "qcow2");
        mapA.Save(MapOf(a));
        Seal(a);

        await Images.IoAsync(b.Image, Changes(3, 23));
        var retry = await RunTripAsync(dir, b, a);
        Assert.True(retry.Identical, retry.CompareOutput);
        Assert.Equal("store-match", retry.Sender.Mode);
        Assert.Equal(2, retry.Sender.DiskDoubtBlocks);
        Assert.True(retry.Sender.StreamBytes < first.Sender.StreamBytes / 4, $"retry carried {retry.Sender.StreamBytes} of {first.Sender.StreamBytes}");
        await AssertMapsAgreeAsync(b, a);
    }

    [Fact]
    public async Task AMapWhollyInDoubtIsNotUsedAndTheStatsSayWhy()
    {
        if (!TestEnv.Require(output, "qemu-system-x86_64", "qemu-nbd", "qemu-img", "qemu-io"))
            return;
        var (dir, a, b) = Setup();
        using var _ = dir;
        await Images.CreateRandomQcow2Async(a.Image, Size, seed: 18);
        await Images.CreateAsync(b.Image, Size);
        var first = await RunTripAsync(dir, a, b);
        Assert.Equal("no map of this export yet", first.Sender.DiskMapUnused);
        // bfmigd's invalidation (the guest was started on A while away): every block of A's map in doubt.
        DiskBlockMap.MarkInFlux(MapOf(a));
        await Images.IoAsync(b.Image, Changes(2, 4));
        var back = await RunTripAsync(dir, b, a);
        Assert.True(back.Identical, back.CompareOutput);
        Assert.Equal("store-full", back.Receiver.Mode);
        Assert.Contains("in doubt", back.Receiver.DiskMapUnused);
        Assert.NotNull(back.Sender.DiskMapUnused);
        await AssertMapsAgreeAsync(b, a);
    }

    [Fact]
    public async Task CliTripsSurviveAReceiverKilledBySigkill()
    {
        if (!TestEnv.Require(output, "qemu-system-x86_64", "qemu-nbd", "qemu-img", "qemu-io"))
            return;
        var (dir, a, b) = Setup();
        using var _ = dir;
        await Images.CreateRandomQcow2Async(a.Image, Size, seed: 15);
        await Images.CreateAsync(b.Image, Size);

        var first = await RunCliTripAsync(dir, a, b);
        Assert.Equal((0, 0), (first.SenderExit, first.ReceiverExit));
        Assert.True(first.Identical, first.CompareOutput);
        Assert.True(first.Sender!["committed"]!.GetValue<bool>());
        long firstBytes = first.Sender["streamBytes"]!.GetValue<long>();
        await AssertMapsAgreeAsync(a, b);

        await Images.IoAsync(b.Image, Changes(5, 21));
        var back = await RunCliTripAsync(dir, b, a);
        Assert.Equal((0, 0), (back.SenderExit, back.ReceiverExit));
        Assert.True(back.Identical, back.CompareOutput);
        Assert.Equal("store-match", back.Sender!["mode"]!.GetValue<string>());
        Assert.True(back.Sender["streamBytes"]!.GetValue<long>() < firstBytes / 20, $"return trip carried {back.Sender["streamBytes"]} of {firstBytes}");
        await AssertMapsAgreeAsync(b, a);

        // To B again, and B's helper dies (SIGKILL) while the mirror writes its image.
        await Images.IoAsync(a.Image, Changes(5, 33));
        var killed = await RunCliTripAsync(dir, a, b, killReceiver: true);
        Assert.NotEqual(0, killed.SenderExit);
        Assert.NotNull(killed.Sender!["error"]);
        Assert.True(DiskBlockMap.IsInFlux(MapOf(b)), "killed receiver's map has no journal");
        // Killed, it could not settle its journal: the coarse one stays, never less than it wrote.
        Assert.False(DiskDoubtJournal.Read(MapOf(b)).Whole);
        Seal(b);

        var retry = await RunCliTripAsync(dir, a, b);
        Assert.Equal((0, 0), (retry.SenderExit, retry.ReceiverExit));
        Assert.True(retry.Identical, retry.CompareOutput);
        Assert.Equal("store-match", retry.Sender!["mode"]!.GetValue<string>());
        await AssertMapsAgreeAsync(a, b);
    }

    [Fact]
    public async Task WithoutStoresTheDiskGoesThroughThePlainTunnel()
    {
        if (!TestEnv.Require(output, "qemu-system-x86_64", "qemu-nbd", "qemu-img"))
            return;
        var (dir, a, b) = Setup();
        using var _ = dir;
        await Images.CreateRandomQcow2Async(a.Image, Size, seed: 14);
        await Images.CreateAsync(b.Image, Size);
        var trip = await RunTripAsync(dir, a, new Host("b", b.Image, store: null));
        Assert.True(trip.Identical, trip.CompareOutput);
        Assert.Equal("plain", trip.Sender.Mode);
        Assert.Equal("plain", trip.Receiver.Mode);
        Assert.False(Directory.Exists(Path.Combine(a.Store!, Guest.ToString("D"), "disk")), "a store-less receiver made the sender keep a map");
    }

    [Fact]
    public void ExportNamesMapToDistinctPlainFiles()
    {
        Assert.Equal("drive-virtio-disk0", DiskMapStore.FileNameFor("drive-virtio-disk0"));
        Assert.Equal("libvirt-1-storage", DiskMapStore.FileNameFor("libvirt-1-storage"));
        Assert.Equal("0", DiskMapStore.FileNameFor(""));
        string slash = DiskMapStore.FileNameFor("../etc/x");
        Assert.DoesNotContain('/', slash);
        Assert.False(slash.StartsWith('.'));
        Assert.NotEqual(DiskMapStore.FileNameFor("a/b"), DiskMapStore.FileNameFor("a_b"));
        Assert.NotEqual(DiskMapStore.FileNameFor("a/b"), DiskMapStore.FileNameFor("a:b"));
    }

    [Fact]
    public void DiskChannelControlPayloadsRoundTripAndRejectGarbage()
    {
        var key = DiskHashKey.NewRandom();
        var doubt = DiskDoubt.Of([new BlockRange(7, 3), new BlockRange(100, 1)]);
        var hello = DiskChannel.EncodeExportHello(UInt128.MaxValue - 5, key, Export, doubt);
        var (digest, decodedKey, name, decodedDoubt) = DiskChannel.DecodeExportHello(hello);
        Assert.Equal((UInt128.MaxValue - 5, key, Export), (digest, decodedKey, name));
        Assert.Equal(doubt.Ranges, decodedDoubt.Ranges);
        Assert.Throws<PeerProtocolException>(() => DiskChannel.DecodeExportHello(hello.AsSpan(0, hello.Length - 1)));
        Assert.True(DiskChannel.DecodeExportHello(DiskChannel.EncodeExportHello(1, key, Export, DiskDoubt.All)).Doubt.Whole);
        var reply = DiskChannel.EncodeExportReply(true, 9, doubt);
        var (match, replyDigest, replyDoubt) = DiskChannel.DecodeExportReply(reply);
        Assert.True(match);
        Assert.Equal((UInt128)9, replyDigest);
        Assert.Equal(doubt.Ranges, replyDoubt.Ranges);
        reply[^1] ^= 2;
        Assert.Equal(2, DiskChannel.DecodeExportReply(reply).Doubt.Ranges.Count);
        reply[18] = 0xff;
        Assert.Throws<PeerProtocolException>(() => DiskChannel.DecodeExportReply(reply));
        var ack = DiskChannel.EncodeFlagDigest(true, 42);
        Assert.Equal((true, (UInt128)42), DiskChannel.DecodeFlagDigest(ack, "ack"));
        ack[0] = 2;
        Assert.Throws<PeerProtocolException>(() => DiskChannel.DecodeFlagDigest(ack, "ack"));
    }
}
