using BFMig.Tests.Shared.Nbd;
using BFMig.Transfer.Disk;
using BFMig.Transfer.Disk.Nbd;
using Xunit;
using Xunit.Abstractions;

namespace BFMig.Transfer.Tests.Nbd;

/// <summary>
/// The sender's filter and the receiver's observer share one <see cref="NbdExportTracker"/>: fed
/// the same NBD conversation they must end with the same map, bit for bit (the digests decide
/// what later trips elide).
/// </summary>
public sealed class NbdExportTrackerTests(ITestOutputHelper output)
{
    private const ulong TraceImageSize = 2UL << 20;
    private const int TraceBlockSize = 65536;

    [Theory]
    [InlineData("mirror-qemu72.trace.zst", NbdHeaderStyle.Structured)]
    [InlineData("mirror-qemu10.trace.zst", NbdHeaderStyle.Extended)]
    public async Task FilterAndObserverAgreeOnCapturedMirrorTraces(string fixture, NbdHeaderStyle style)
    {
        if (!TestEnv.Require(output, "zstd"))
            return;
        var records = await NbdTraceFixtureTests.LoadAsync(fixture);
        byte[] clientBytes = [.. records.Where(r => r.FromClient).SelectMany(r => r.Bytes)];
        byte[] content = NbdTraceFixtureTests.TraceImageContent();
        var truth = FakeRig.MapOf(content, TraceBlockSize);

        // First trip into an empty target (nothing elided), then again into a target that holds
        // the content (everything elided): both sides must report the same map each time.
        foreach (var (retained, disk) in new[] { (new DiskBlockMap(TraceImageSize), new byte[TraceImageSize]), (truth, (byte[])content.Clone()) })
        {
            var (sender, receiver) = await ReplayTappedAsync(clientBytes, disk, retained, style);
            Assert.False(sender.LastTripUnclean);
            Assert.False(receiver.LastTripUnclean);
            Assert.Equal(sender.ComputeDigest(), receiver.ComputeDigest());
            Assert.Equal(truth.ComputeDigest(), sender.ComputeDigest());
            for (long b = 0; b < sender.BlockCount; b++)
            {
                Assert.Equal(sender.TryGetHash(b, out var s), receiver.TryGetHash(b, out var r));
                Assert.Equal(s, r);
            }
        }
    }

    [Fact]
    public void TrackersFedTheSameEventsReportTheSameMap()
    {
        var retained = new DiskBlockMap(1 << 20, 4096);
        var a = new NbdExportTracker(retained);
        var b = new NbdExportTracker(retained);
        var sevens = new byte[4096];
        Array.Fill(sevens, (byte)7);
        foreach (var t in new[] { a, b })
        {
            Assert.Equal(NbdOptionStep.Done, t.OnOptionReply(NbdOption.StructuredReply, Reply(NbdOption.StructuredReply, NbdOptionReplyType.Ack), 0));
            Assert.Equal(NbdOptionStep.MoreReplies, t.OnOptionReply(NbdOption.Go, ExportInfo(1 << 20), 0));
            Assert.Equal(NbdOptionStep.Transmission, t.OnOptionReply(NbdOption.Go, Reply(NbdOption.Go, NbdOptionReplyType.Ack), 0));
            t.StartTransmission();
            t.Apply(new BlockCommit(3, 2, BlockCommitKind.Zero, default), succeeded: true);
            t.Apply(new BlockCommit(9, 1, BlockCommitKind.Data, t.HashBlock(sevens)), succeeded: true);
            t.Apply(new BlockCommit(10, 1, BlockCommitKind.Data, 1), succeeded: false);
        }
        Assert.Equal(NbdHeaderStyle.Structured, a.Style);
        Assert.Equal(1UL << 20, a.ExportSize);
        var ma = new DiskBlockMap(1 << 20, 4096);
        var mb = new DiskBlockMap(1 << 20, 4096);
        a.Report(ma, clean: true);
        b.Report(mb, clean: true);
        Assert.Equal(ma.ComputeDigest(), mb.ComputeDigest());
        Assert.True(ma.TryGetHash(3, out var zero));
        Assert.Equal(a.ZeroHash(3), zero);
        Assert.True(ma.TryGetHash(9, out _));
        Assert.False(ma.TryGetHash(10, out _));
    }

    [Fact]
    public void ExportLargerThanTheLimitIsRefusedAndReportedWithTheRetainedGeometry()
    {
        var retained = new DiskBlockMap(1 << 20, 4096);
        var tracker = new NbdExportTracker(retained) { MaxExportSize = 1 << 20 };
        tracker.OnExportInfo(1UL << 40, NbdTransmissionFlags.HasFlags);
        var e = Assert.Throws<NbdProtocolException>(tracker.StartTransmission);
        Assert.Contains($"{1UL << 40} bytes", e.Message, StringComparison.Ordinal);
        Assert.Contains($"{1 << 20} bytes", e.Message, StringComparison.Ordinal);
        Assert.False(tracker.Transmitting);
        var recorded = new DiskBlockMap(0, 4096);
        tracker.Report(recorded, clean: true);
        Assert.Equal(1UL << 20, recorded.ImageSize);
        Assert.True(recorded.LastTripUnclean);
    }

    /// <summary>
    /// A peer's NBD server that declares an export larger than the source disk: the filter fails
    /// the stream with both sizes named, before allocating a map for the declared size.
    /// </summary>
    [Fact]
    public async Task FilterRefusesAnExportLargerThanTheSourceDisk()
    {
        var disk = new byte[4 << 20];
        var server = new FakeNbdServer(disk);
        var (clientSide, filterClient) = await SocketPair.CreateAsync();
        var (filterUp, serverSide) = await SocketPair.CreateAsync();
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(20));
        var retained = new DiskBlockMap(1 << 20, 65536);
        var recorded = new DiskBlockMap(0, 65536);
        var filter = new NbdSenderFilter(new NbdSenderFilterOptions { SourceDiskSize = _ => 1 << 20, DrainTimeout = TimeSpan.FromSeconds(2) });
        var serverTask = Task.Run(() => server.RunAsync(serverSide, cts.Token));
        var filterTask = Task.Run(() => filter.RunAsync(filterClient, filterUp, retained, recorded, cts.Token));
        var connect = NbdClient.ConnectAsync(clientSide, new NbdClientOptions(), cts.Token);
        var e = await Assert.ThrowsAsync<NbdProtocolException>(() => filterTask);
        Assert.Contains($"NBD export of {4 << 20} bytes", e.Message, StringComparison.Ordinal);
        Assert.Contains($"source disk ({1 << 20} bytes)", e.Message, StringComparison.Ordinal);
        Assert.Equal(1UL << 20, recorded.ImageSize);
        Assert.True(recorded.LastTripUnclean);
        foreach (var s in new[] { clientSide, filterClient, filterUp, serverSide })
            await s.DisposeAsync();
        try
        {
            await (await connect).DisposeAsync();
        }
        catch (Exception)
        {
            // The client may see the stream end during or after its handshake.
        }
        await serverTask.ContinueWith(_ => { }, TaskScheduler.Default).WaitAsync(TimeSpan.FromSeconds(5));
    }

    [Fact]
    public void QcowVirtualSizeIsReadFromTheHeader()
    {
        using var dir = TestEnv.CreateTempDir();
        string qcow = dir.File("a.qcow2");
        var header = new byte[104];
        header[0] = 0x51; header[1] = 0x46; header[2] = 0x49; header[3] = 0xfb;
        System.Buffers.Binary.BinaryPrimitives.WriteUInt64BigEndian(header.AsSpan(24), 10UL << 30);
        File.WriteAllBytes(qcow, header);
        Assert.Equal(10UL << 30, new DiskImageSpec(qcow, "qcow2").ReadVirtualSize());
        string raw = dir.File("a.raw");
        File.WriteAllBytes(raw, new byte[12345]);
        Assert.Equal(12345UL, new DiskImageSpec(raw, "raw").ReadVirtualSize());
        Assert.Null(new DiskImageSpec(raw, "qcow2").ReadVirtualSize());
        Assert.Null(new DiskImageSpec(dir.File("missing"), "raw").ReadVirtualSize());
    }

    // The filter between the replayed client and an in-memory server, the observer tapping the
    // upstream side exactly as the receiver's pump does.
    private static async Task<(DiskBlockMap Sender, DiskBlockMap Receiver)> ReplayTappedAsync(byte[] clientBytes, byte[] disk, IDiskBlockView retained, NbdHeaderStyle style)
    {
        var (clientSide, filterClient) = await SocketPair.CreateAsync();
        var (filterUp, serverSide) = await SocketPair.CreateAsync();
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(30));
        var server = new FakeNbdServer(disk, structured: true, extended: style == NbdHeaderStyle.Extended);
        var observer = new NbdStreamObserver(retained);
        var sender = new DiskBlockMap(TraceImageSize);
        var filter = new NbdSenderFilter();
        var serverTask = Task.Run(() => server.RunAsync(serverSide, cts.Token));
        var filterTask = Task.Run(() => filter.RunAsync(filterClient, new TapStream(filterUp, observer), retained, sender, cts.Token));
        var drain = Task.Run(async () =>
        {
            var sink = new byte[1 << 16];
            while (await clientSide.ReadAsync(sink, cts.Token) > 0)
            {
            }
        });
        await clientSide.WriteAsync(clientBytes, cts.Token);
        var result = await filterTask.WaitAsync(cts.Token);
        Assert.True(result.CleanDisconnect);
        Assert.Empty(server.Violations);
        foreach (var s in new[] { clientSide, filterClient, filterUp, serverSide })
            await s.DisposeAsync();
        await Task.WhenAll(serverTask, drain.ContinueWith(_ => { }, TaskScheduler.Default)).WaitAsync(TimeSpan.FromSeconds(5));
        var receiver = new DiskBlockMap(TraceImageSize);
        observer.Report(receiver);
        return (sender, receiver);
    }

    private static NbdOptionReply Reply(NbdOption option, NbdOptionReplyType type, byte[]? data = null)
    {
        data ??= [];
        var bytes = new byte[NbdHandshake.OptionReplyHeaderLength + data.Length];
        NbdHandshake.WriteOptionReplyHeader(bytes, option, type, data.Length);
        data.CopyTo(bytes, NbdHandshake.OptionReplyHeaderLength);
        var seq = new System.Buffers.ReadOnlySequence<byte>(bytes);
        Assert.True(NbdHandshake.TryReadOptionReply(ref seq, 0, out var reply));
        return reply;
    }

    private static NbdOptionReply ExportInfo(ulong size)
    {
        var data = new byte[12];
        System.Buffers.Binary.BinaryPrimitives.WriteUInt16BigEndian(data, 0); // NBD_INFO_EXPORT
        System.Buffers.Binary.BinaryPrimitives.WriteUInt64BigEndian(data.AsSpan(2), size);
        System.Buffers.Binary.BinaryPrimitives.WriteUInt16BigEndian(data.AsSpan(10), (ushort)NbdTransmissionFlags.HasFlags);
        return Reply(NbdOption.Go, NbdOptionReplyType.Info, data);
    }
}

