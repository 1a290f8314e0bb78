using System.Buffers.Binary;
using BFMig.Tests.Shared.Nbd;
using BFMig.Transfer.Disk.Nbd;
using BFMig.Transfer.Disk;
using Xunit.Abstractions;
using Xunit;

namespace BFMig.Transfer.Tests.Nbd;

/// <summary>
/// Replays captured real QEMU mirror traces (Fixtures/Nbd/*.trace.zst, see the README there).
/// Set BFMIG_REGENERATE_FIXTURES=1 to capture them again from the installed QEMUs.
/// </summary>
[Collection("qemu")]
public sealed class NbdTraceFixtureTests(ITestOutputHelper output)
{
    private const ulong ImageSize = 2UL << 20;
    private const int BlockSize = 65536;

    /// <summary>The traced source image: 32 blocks, every fourth unallocated, the rest a per-block byte pattern.</summary>
    internal static byte[] TraceImageContent()
    {
        var content = new byte[ImageSize];
        for (int b = 0; b < 32; b++)
        {
            if (b % 4 == 3)
                continue;
            for (int i = 0; i < BlockSize; i++)
                content[b * BlockSize + i] = (byte)(b * 7 + 1 + (i >> 12));
        }
        return content;
    }

    private static string FixturePath(string name) => Path.Combine(AppContext.BaseDirectory, "Fixtures", "Nbd", name);

    private static string SourceFixturePath(string name)
    {
        string? dir = AppContext.BaseDirectory;
        while (dir is not null && !File.Exists(Path.Combine(dir, "BFMig.Transfer.Tests.csproj")))
            dir = Path.GetDirectoryName(dir);
        return Path.Combine(dir ?? throw new DirectoryNotFoundException("test project directory"), "Fixtures", "Nbd", name);
    }

    private async Task CaptureAsync(string qemu, string fixture)
    {
        using var dir = TestEnv.CreateTempDir();
        string raw = dir.File("src.raw");
        string source = dir.File("src.qcow2");
        string target = dir.File("dst.qcow2");
        byte[] content = TraceImageContent();
        await using (var f = new FileStream(raw, FileMode.Create))
        {
            for (int b = 0; b < 32; b++)
            {
                if (b % 4 == 3)
                    f.Seek(BlockSize, SeekOrigin.Current);
                else
                    f.Write(content, b * BlockSize, BlockSize);
            }
            f.SetLength((long)ImageSize);
        }
        await TestEnv.RunAsync("qemu-img", ["convert", "-q", "-f", "raw", "-O", "qcow2", raw, source]);
        await Images.CreateAsync(target, ImageSize);
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(120));
        var records = new List<(bool FromClient, byte[] Bytes)>();
        // QEMU 7.2 writes into qemu-nbd (no extended headers); QEMU 10 into a QEMU 10 export (extended).
        bool qemuDestination = qemu == TestEnv.Qemu10;
        QemuNbdServer? nbd = null;
        QemuQmp? destination = null;
        string upstreamSock = dir.File("dst.sock");
        if (qemuDestination)
            destination = await QemuDestination.StartAsync(qemu, target, upstreamSock, dir.File("dst.qmp"), cts.Token);
        else
            nbd = await QemuNbdServer.StartAsync(target, "qcow2", upstreamSock, ["--cache=none", "--aio=threads"], TimeSpan.FromSeconds(20), cts.Token);
        try
        {
            await using var harness = new FilterHarness(dir.File("filter.sock"), async c =>
            {
                var s = new System.Net.Sockets.Socket(System.Net.Sockets.AddressFamily.Unix, System.Net.Sockets.SocketType.Stream, System.Net.Sockets.ProtocolType.Unspecified);
                await s.ConnectAsync(new System.Net.Sockets.UnixDomainSocketEndPoint(upstreamSock), c);
                return new System.Net.Sockets.NetworkStream(s, ownsSocket: true);
            }, new DiskBlockMap(ImageSize), cts.Token,
                capture: (fromClient, bytes) =>
                {
                    lock (records)
                        records.Add((fromClient, bytes));
                });
            await Mirror.RunAsync(qemu, source, harness.SocketPath, qemuDestination ? QemuDestination.ExportName : "", discardUnmap: false, dir.File("src.qmp"), cts.Token);
            await harness.Completion.WaitAsync(cts.Token);
        }
        finally
        {
            if (nbd is not null)
                await nbd.DisposeAsync();
            if (destination is not null)
                await destination.DisposeAsync();
        }
        string plain = dir.File("trace");
        await using (var f = new FileStream(plain, FileMode.Create))
        {
            var head = new byte[5];
            foreach (var (fromClient, bytes) in records)
            {
                if (bytes.Length == 0)
                    continue;
                head[0] = fromClient ? (byte)0 : (byte)1;
                BinaryPrimitives.WriteInt32BigEndian(head.AsSpan(1), bytes.Length);
                f.Write(head);
                f.Write(bytes);
            }
        }
        await TestEnv.RunAsync("zstd", ["-q", "-19", "-f", plain, "-o", SourceFixturePath(fixture)]);
        Directory.CreateDirectory(Path.GetDirectoryName(FixturePath(fixture))!);
        File.Copy(SourceFixturePath(fixture), FixturePath(fixture), overwrite: true);
        output.WriteLine($"captured {records.Count} records into {SourceFixturePath(fixture)}");
    }

    internal static async Task<List<(bool FromClient, byte[] Bytes)>> LoadAsync(string fixture)
    {
        byte[] plain = Convert.FromBase64String(await TestEnv.RunAsync("sh", ["-c", $"zstd -q -d -c '{FixturePath(fixture)}' | base64 -w0"]));
        var records = new List<(bool, byte[])>();
        for (int at = 0; at < plain.Length;)
        {
            bool fromClient = plain[at] == 0;
            int length = BinaryPrimitives.ReadInt32BigEndian(plain.AsSpan(at + 1));
            records.Add((fromClient, plain.AsSpan(at + 5, length).ToArray()));
            at += 5 + length;
        }
        return records;
    }

    [Theory]
    [InlineData("mirror-qemu72.trace.zst", "qemu-system-x86_64", NbdHeaderStyle.Structured)]
    [InlineData("mirror-qemu10.trace.zst", TestEnv.Qemu10, NbdHeaderStyle.Extended)]
    public async Task CapturedMirrorTraceReplaysThroughObserverAndFilter(string fixture, string qemu, NbdHeaderStyle expectedStyle)
    {
        if (!TestEnv.Require(output, "zstd"))
            return;
        if (Environment.GetEnvironmentVariable("BFMIG_REGENERATE_FIXTURES") == "1")
        {
            if (!TestEnv.Require(output, qemu, "qemu-nbd", "qemu-img"))
                return;
            await CaptureAsync(qemu, fixture);
        }
        var records = await LoadAsync(fixture);
        byte[] content = TraceImageContent();
        var truth = FakeRig.MapOf(content, BlockSize);

        // The receiver's tap, fed the captured conversation, derives the source's map.
        var observer = new NbdStreamObserver(new DiskBlockMap(ImageSize));
        foreach (var (fromClient, bytes) in records)
        {
            if (fromClient)
                observer.OnClientBytes(bytes);
            else
                observer.OnServerBytes(bytes);
        }
        var observed = new DiskBlockMap(ImageSize);
        observer.Report(observed);
        Assert.Equal(expectedStyle, observer.Style);
        Assert.True(observer.SawDisconnect);
        Assert.False(observed.LastTripUnclean);
        Assert.Equal(truth.ComputeDigest(), observed.ComputeDigest());

        // Fed in arbitrary small pieces (as a socket delivers them), the tap sees the same.
        var chopped = new NbdStreamObserver(new DiskBlockMap(ImageSize));
        var rng = new Random(5);
        foreach (var (fromClient, bytes) in records)
        {
            for (int at = 0; at < bytes.Length;)
            {
                int n = Math.Min(bytes.Length - at, rng.Next(1, 3000));
                if (fromClient)
                    chopped.OnClientBytes(bytes.AsSpan(at, n));
                else
                    chopped.OnServerBytes(bytes.AsSpan(at, n));
                at += n;
            }
        }
        var choppedMap = new DiskBlockMap(ImageSize);
        chopped.Report(choppedMap);
        Assert.False(choppedMap.LastTripUnclean);
        Assert.Equal(truth.ComputeDigest(), choppedMap.ComputeDigest());

        // The captured client bytes, replayed through the filter into an empty in-memory target...
        byte[] clientBytes = [.. records.Where(r => r.FromClient).SelectMany(r => r.Bytes)];
        var empty = new byte[ImageSize];
        var first = await ReplayAsync(clientBytes, empty, new DiskBlockMap(ImageSize), expectedStyle);
        Assert.Equal(content, empty);
        Assert.Equal(truth.ComputeDigest(), first.Recorded.ComputeDigest());
        Assert.True(first.Stats.BytesForwarded >= 24 * BlockSize);

        // ...and into a target that already holds the content: nothing but headers crosses.
        var retained = (byte[])content.Clone();
        var second = await ReplayAsync(clientBytes, retained, truth, expectedStyle);
        Assert.Equal(content, retained);
        Assert.Equal(0, second.Stats.BytesForwarded);
        Assert.Equal(24, second.Stats.BlocksElided);
        Assert.Equal(truth.ComputeDigest(), second.Recorded.ComputeDigest());
    }

    private static async Task<(NbdFilterStats Stats, DiskBlockMap Recorded)> ReplayAsync(byte[] clientBytes, byte[] disk, IDiskBlockView retained, NbdHeaderStyle style)
    {
        var (clientSide, filterClient) = await SocketPair.CreateAsync();
        var (filterUp, serverSide) = await SocketPair.CreateAsync();
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(30));
        var server = new FakeNbdServer(disk, structured: true, extended: style == NbdHeaderStyle.Extended);
        var recorded = new DiskBlockMap(ImageSize);
        var filter = new NbdSenderFilter();
        var serverTask = Task.Run(() => server.RunAsync(serverSide, cts.Token));
        var filterTask = Task.Run(() => filter.RunAsync(filterClient, filterUp, retained, recorded, cts.Token));
        // Drain replies so neither side blocks; the captured client does not wait for them.
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
        return (filter.Stats, recorded);
    }
}
