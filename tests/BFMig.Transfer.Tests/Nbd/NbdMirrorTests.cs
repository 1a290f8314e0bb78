using BFMig.Tests.Shared.Nbd;
using BFMig.Transfer.Disk.Nbd;
using BFMig.Transfer.Disk;
using BFMig.Transfer.Store;
using Xunit.Abstractions;
using Xunit;

namespace BFMig.Transfer.Tests.Nbd;

/// <summary>
/// Real QEMU mirror jobs (blockdev-mirror sync=full, as libvirt's --copy-storage-all) through
/// <see cref="NbdSenderFilter"/> into a real NBD server holding the receiver's retained image.
/// </summary>
[Collection("qemu")]
public sealed class NbdMirrorTests(ITestOutputHelper output)
{
    private const ulong Size = 64UL << 20;
    private static readonly TimeSpan Timeout = TimeSpan.FromSeconds(180);

    private sealed record Trip(NbdFilterResult Result, NbdFilterStats Stats, DiskBlockMap Recorded, DiskBlockMap Observed, bool Identical, string CompareOutput);

    private async Task<Trip> RunTripAsync(TempDir dir, string source, string target, IDiskBlockView retained, bool discardUnmap, string qemu = "qemu-system-x86_64", bool qemuDestination = false)
    {
        using var cts = new CancellationTokenSource(Timeout);
        var ct = cts.Token;
        string upstreamSock = dir.File("dst.sock");
        QemuNbdServer? nbd = null;
        QemuQmp? destination = null;
        string exportName = "";
        if (qemuDestination)
        {
            destination = await QemuDestination.StartAsync(qemu, target, upstreamSock, dir.File("dst.qmp"), ct);
            exportName = QemuDestination.ExportName;
        }
        else
        {
            nbd = await QemuNbdServer.StartAsync(target, "qcow2", upstreamSock, ["--cache=none", "--aio=threads", "--discard=unmap"], TimeSpan.FromSeconds(20), ct);
        }
        NbdFilterResult result;
        NbdSenderFilter filter;
        DiskBlockMap recorded;
        DiskBlockMap observed;
        try
        {
            await using var harness = new FilterHarness(dir.File("filter.sock"), async c =>
            {
                var s = new System.Net.Sockets.Socket(System.Net.Sockets.AddressFamily.Unix, System.Net.Sockets.SocketType.Stream, System.Net.Sockets.ProtocolType.Unspecified);
                await s.ConnectAsync(new System.Net.Sockets.UnixDomainSocketEndPoint(upstreamSock), c);
                return new System.Net.Sockets.NetworkStream(s, ownsSocket: true);
            }, retained, ct);
            var mirror = Mirror.RunAsync(qemu, source, harness.SocketPath, exportName, discardUnmap, dir.File("src.qmp"), ct);
            await mirror;
            result = await harness.Completion.WaitAsync(TimeSpan.FromSeconds(30), ct);
            filter = harness.Filter;
            recorded = harness.Recorded;
            observed = harness.ObserverMap;
        }
        finally
        {
            if (nbd is not null)
                await nbd.DisposeAsync();
            if (destination is not null)
                await destination.DisposeAsync();
        }
        output.WriteLine($"{qemu}: style={result.Style} clean={result.CleanDisconnect} {filter.Stats}");
        var (identical, compare) = await Images.CompareAsync(source, target);
        output.WriteLine(compare.Trim());
        return new Trip(result, filter.Stats, recorded, observed, identical, compare);
    }

    [Fact]
    public async Task FirstTripForwardsEverythingAndRecordsTheMap()
    {
        if (!TestEnv.Require(output, "qemu-system-x86_64", "qemu-nbd", "qemu-img"))
            return;
        using var dir = TestEnv.CreateTempDir();
        string source = dir.File("src.qcow2");
        string target = dir.File("dst.qcow2");
        await Images.CreateRandomQcow2Async(source, Size, seed: 1, fillFraction: 0.75);
        await Images.CreateAsync(target, Size);

        var trip = await RunTripAsync(dir, source, target, new DiskBlockMap(Size), discardUnmap: false);

        Assert.True(trip.Identical, trip.CompareOutput);
        Assert.True(trip.Result.CleanDisconnect);
        // QEMU 7.2's client asks for structured replies; 10.0's for extended headers too.
        Assert.Equal(TestEnv.SystemNbdServerBestStyle, trip.Result.Style);
        Assert.Equal(0, trip.Stats.BlocksElided);
        Assert.True(trip.Stats.BytesForwarded >= (long)(Size * 6 / 10), $"forwarded only {trip.Stats.BytesForwarded}");
        var truth = await DiskBlockMapBuilder.BuildFromImageAsync(source, "qcow2");
        Assert.Equal(truth.BlockCount, trip.Recorded.KnownCount);
        Assert.Equal(truth.ComputeDigest(), trip.Recorded.ComputeDigest());
        Assert.Equal(trip.Recorded.ComputeDigest(), trip.Observed.ComputeDigest());
        Assert.False(trip.Recorded.LastTripUnclean);
    }

    [Fact]
    public async Task TwoTripsUseTheMapRecordedOnTheFirst()
    {
        if (!TestEnv.Require(output, "qemu-system-x86_64", "qemu-nbd", "qemu-img", "qemu-io"))
            return;
        using var dir = TestEnv.CreateTempDir();
        string source = dir.File("src.qcow2");
        string target = dir.File("dst.qcow2");
        string mapPath = dir.File("peer-view.map");
        await Images.CreateRandomQcow2Async(source, Size, seed: 6, fillFraction: 0.9);
        await Images.CreateAsync(target, Size);

        // Trip 1: the receiver had nothing. The sender keeps what it recorded as its peer view.
        DiskBlockMap.MarkInFlux(mapPath);
        var first = await RunTripAsync(dir, source, target, new DiskBlockMap(Size), discardUnmap: false);
        Assert.True(first.Identical, first.CompareOutput);
        first.Recorded.Save(mapPath);
        DiskBlockMap.ClearInFlux(mapPath);

        // While the guest ran elsewhere, 2% of its disk changed and 1 MiB was discarded.
        var changes = Enumerable.Range(0, 20).Select(i => $"write -P 0x{0x40 + i:x2} {(i * 51 + 3) * 65536} 64k").Append("discard 60M 1M").ToList();
        await Images.IoAsync(source, changes);

        // Trip 2: the loaded peer view is all the sender consults; nothing is re-read.
        var peerView = DiskBlockMap.Load(mapPath);
        Assert.False(peerView.LastTripUnclean);
        var second = await RunTripAsync(dir, source, target, peerView, discardUnmap: false);
        Assert.True(second.Identical, second.CompareOutput);
        Assert.True(second.Stats.BytesForwarded <= 20 * 65536, $"forwarded {second.Stats.BytesForwarded}");
        Assert.True(second.Stats.BlocksForwarded >= 19, second.Stats.ToString());
        var truth = await DiskBlockMapBuilder.BuildFromImageAsync(source, "qcow2");
        Assert.Equal(truth.ComputeDigest(), second.Recorded.ComputeDigest());
        Assert.Equal(second.Recorded.ComputeDigest(), second.Observed.ComputeDigest());
    }

    [Fact]
    public async Task ReturnTripWithOnePercentChangedForwardsOnlyTheChange()
    {
        if (!TestEnv.Require(output, "qemu-system-x86_64", "qemu-nbd", "qemu-img", "qemu-io"))
            return;
        using var dir = TestEnv.CreateTempDir();
        string retainedImage = dir.File("left.qcow2");
        string source = dir.File("src.qcow2");
        string target = dir.File("dst.qcow2");
        await Images.CreateRandomQcow2Async(retainedImage, Size, seed: 2);
        await Images.CopyAsync(retainedImage, source);
        await Images.CopyAsync(retainedImage, target);
        var changes = Enumerable.Range(0, 10).Select(i => $"write -P 0x{0x30 + i:x2} {(i * 97 + 5) * 65536} 64k").ToList();
        await Images.IoAsync(source, changes);
        var retained = await DiskBlockMapBuilder.BuildFromImageAsync(target, "qcow2");

        var trip = await RunTripAsync(dir, source, target, retained, discardUnmap: false);

        Assert.True(trip.Identical, trip.CompareOutput);
        Assert.True(trip.Stats.BytesForwarded < (long)(Size / 20), $"forwarded {trip.Stats.BytesForwarded} of {Size}");
        Assert.True(trip.Stats.BlocksForwarded >= 10, $"only {trip.Stats.BlocksForwarded} blocks forwarded, 10 changed");
        Assert.True(trip.Stats.BlocksElided >= 1000);
        var truth = await DiskBlockMapBuilder.BuildFromImageAsync(source, "qcow2");
        Assert.Equal(truth.ComputeDigest(), trip.Recorded.ComputeDigest());
        Assert.Equal(trip.Recorded.ComputeDigest(), trip.Observed.ComputeDigest());
    }

    [Fact]
    public async Task DiscardedSourceRegionDoesNotLeaveStaleRetainedData()
    {
        if (!TestEnv.Require(output, "qemu-system-x86_64", "qemu-nbd", "qemu-img", "qemu-io"))
            return;
        using var dir = TestEnv.CreateTempDir();
        string retainedImage = dir.File("left.qcow2");
        string source = dir.File("src.qcow2");
        string target = dir.File("dst.qcow2");
        await Images.CreateRandomQcow2Async(retainedImage, Size, seed: 3);
        await Images.CopyAsync(retainedImage, source);
        await Images.CopyAsync(retainedImage, target);
        // The guest discarded 8 MiB and rewrote one block while away.
        await Images.IoAsync(source, ["discard 16M 8M", "write -P 0x55 40M 64k"]);
        var retained = await DiskBlockMapBuilder.BuildFromImageAsync(target, "qcow2");

        var trip = await RunTripAsync(dir, source, target, retained, discardUnmap: false);

        Assert.True(trip.Identical, trip.CompareOutput);
        Assert.True(trip.Stats.BlocksZeroed >= 128, $"zeroed {trip.Stats.BlocksZeroed} blocks, 128 were discarded");
        Assert.True(trip.Stats.BytesForwarded < (long)(Size / 20));
        var truth = await DiskBlockMapBuilder.BuildFromImageAsync(source, "qcow2");
        Assert.Equal(truth.ComputeDigest(), trip.Recorded.ComputeDigest());
        Assert.Equal(trip.Recorded.ComputeDigest(), trip.Observed.ComputeDigest());
    }

    [Fact]
    public async Task PreZeroingMirrorIsResolvedAgainstRetainedContent()
    {
        if (!TestEnv.Require(output, "qemu-system-x86_64", "qemu-nbd", "qemu-img", "qemu-io"))
            return;
        using var dir = TestEnv.CreateTempDir();
        string retainedImage = dir.File("left.qcow2");
        string source = dir.File("src.qcow2");
        string target = dir.File("dst.qcow2");
        await Images.CreateRandomQcow2Async(retainedImage, Size, seed: 4);
        await Images.CopyAsync(retainedImage, source);
        await Images.CopyAsync(retainedImage, target);
        await Images.IoAsync(source, ["discard 8M 4M", "write -P 0x66 48M 64k", "write -P 0x67 50M 128k"]);
        var retained = await DiskBlockMapBuilder.BuildFromImageAsync(target, "qcow2");

        // discard=unmap on the NBD node makes the target "write zeroes with unmap" capable, so
        // mirror_dirty_init takes the zero_target branch: zero the whole target first, then copy
        // only what is allocated on the source.
        var trip = await RunTripAsync(dir, source, target, retained, discardUnmap: true);

        Assert.True(trip.Identical, trip.CompareOutput);
        Assert.True(trip.Stats.ZeroBlocksDeferred >= 1000, $"pre-zeroing not seen: {trip.Stats}");
        Assert.True(trip.Stats.ZeroBlocksMaterialized >= 64, $"the discarded 4 MiB must be zeroed: {trip.Stats}");
        Assert.True(trip.Stats.BytesForwarded < (long)(Size / 20), $"forwarded {trip.Stats.BytesForwarded}");
        var truth = await DiskBlockMapBuilder.BuildFromImageAsync(source, "qcow2");
        Assert.Equal(truth.ComputeDigest(), trip.Recorded.ComputeDigest());
        Assert.Equal(trip.Recorded.ComputeDigest(), trip.Observed.ComputeDigest());
    }

    [Fact]
    public async Task Qemu10MirrorWithExtendedHeadersIntoQemu10Export()
    {
        if (!TestEnv.Require(output, TestEnv.Qemu10, "qemu-img", "qemu-io"))
            return;
        using var dir = TestEnv.CreateTempDir();
        string retainedImage = dir.File("left.qcow2");
        string source = dir.File("src.qcow2");
        string target = dir.File("dst.qcow2");
        await Images.CreateRandomQcow2Async(retainedImage, Size, seed: 5);
        await Images.CopyAsync(retainedImage, source);
        await Images.CopyAsync(retainedImage, target);
        await Images.IoAsync(source, ["write -P 0x71 4M 64k", "discard 32M 2M"]);
        var retained = await DiskBlockMapBuilder.BuildFromImageAsync(target, "qcow2");

        var trip = await RunTripAsync(dir, source, target, retained, discardUnmap: false, qemu: TestEnv.Qemu10, qemuDestination: true);

        Assert.Equal(NbdHeaderStyle.Extended, trip.Result.Style);
        Assert.True(trip.Identical, trip.CompareOutput);
        Assert.True(trip.Stats.BytesForwarded < (long)(Size / 20));
        var truth = await DiskBlockMapBuilder.BuildFromImageAsync(source, "qcow2");
        Assert.Equal(truth.ComputeDigest(), trip.Recorded.ComputeDigest());
        Assert.Equal(trip.Recorded.ComputeDigest(), trip.Observed.ComputeDigest());
    }

    [Fact]
    public async Task Qemu10MirrorIntoQemuNbd72FallsBackToStructuredReplies()
    {
        if (!TestEnv.Require(output, TestEnv.Qemu10, "qemu-nbd", "qemu-img", "qemu-io"))
            return;
        using var dir = TestEnv.CreateTempDir();
        string source = dir.File("src.qcow2");
        string target = dir.File("dst.qcow2");
        await Images.CreateRandomQcow2Async(source, Size, seed: 7);
        await Images.CopyAsync(source, target);
        await Images.IoAsync(source, ["write -P 0x72 12M 128k"]);
        var retained = await DiskBlockMapBuilder.BuildFromImageAsync(target, "qcow2");

        // A QEMU 10.0 source asks for extended headers; a Debian 12 destination (qemu-nbd 7.2)
        // refuses them and the pair settles on structured replies. On a machine switched to
        // the backports stack the system qemu-nbd is 10.0 too and accepts them.
        var trip = await RunTripAsync(dir, source, target, retained, discardUnmap: false, qemu: TestEnv.Qemu10);

        Assert.Equal(TestEnv.SystemNbdServerBestStyle, trip.Result.Style);
        Assert.True(trip.Identical, trip.CompareOutput);
        Assert.Equal(2, trip.Stats.BlocksForwarded);
        Assert.Equal(trip.Recorded.ComputeDigest(), trip.Observed.ComputeDigest());
    }
}
