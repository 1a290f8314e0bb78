using System.Diagnostics;
using BFMig.Tests.Shared.Nbd;
using BFMig.Transfer.Disk.Nbd;
using BFMig.Transfer.Disk;
using Xunit.Abstractions;
using Xunit;

namespace BFMig.Transfer.Tests.Nbd;

/// <summary>
/// Quick throughput measurement of the filter over loopback with a real qemu-nbd, the way the
/// mirror writes (1 MiB WRITEs, 16 in flight): straight into qemu-nbd, through the filter with
/// every block changed (all forwarded), and with every block unchanged (all elided).
/// Run: <c>dotnet test tests/BFMig.Transfer.Tests -c Release --filter NbdThroughputTests --logger "console;verbosity=detailed"</c>.
/// </summary>
[Collection("qemu")]
[Trait("Category", "Measurement")]
public sealed class NbdThroughputTests(ITestOutputHelper output)
{
    private const int Chunk = 1 << 20;
    private const int Pattern = 32 << 20;
    private const ulong Size = 256UL << 20;

    [Fact]
    public async Task FilterThroughputForUnchangedAndChangedBlocks()
    {
        if (!TestEnv.Require(output, "qemu-nbd", "qemu-img"))
            return;
        using var dir = TestEnv.CreateTempDir();
        string target = dir.File("dst.qcow2");
        await Images.CreateAsync(target, Size);
        var a = new byte[Pattern];
        var b = new byte[Pattern];
        new Random(1).NextBytes(a);
        new Random(2).NextBytes(b);
        using var cts = new CancellationTokenSource(TimeSpan.FromMinutes(5));
        await using var nbd = await QemuNbdServer.StartAsync(target, "qcow2", dir.File("dst.sock"), ["--cache=none", "--aio=threads"], TimeSpan.FromSeconds(20), cts.Token);

        // Direct, to know what qemu-nbd itself sustains here: first pass allocates the qcow2, second overwrites.
        double allocate, direct;
        await using (var s = await nbd.ConnectAsync(cts.Token))
            allocate = await WriteAllAsync(s, a, cts.Token);
        await using (var s = await nbd.ConnectAsync(cts.Token))
            direct = await WriteAllAsync(s, b, cts.Token);

        // All changed: the target holds B, the mirror sends A.
        var (changed, changedStats) = await ThroughFilterAsync(nbd, MapOf(b), a, cts.Token);
        Assert.Equal((long)Size, changedStats.BytesForwarded);
        Assert.Equal(0, changedStats.BlocksElided);

        // All unchanged: the target holds A, the mirror sends A again.
        var (unchanged, unchangedStats) = await ThroughFilterAsync(nbd, MapOf(a), a, cts.Token);
        Assert.Equal(0, unchangedStats.BytesForwarded);
        Assert.Equal((long)(Size / 65536), unchangedStats.BlocksElided);

        // The filter's own ceiling: forward everything into an in-memory server (no disk), against the same server direct.
        double memoryDirect, memory;
        {
            var (clientSide, serverSide) = await SocketPair.CreateAsync();
            var server = new FakeNbdServer(new byte[Size]);
            var serverRun = Task.Run(() => server.RunAsync(serverSide, cts.Token), cts.Token);
            memoryDirect = await WriteAllAsync(clientSide, a, cts.Token);
            await clientSide.DisposeAsync();
            await serverSide.DisposeAsync();
            await serverRun.WaitAsync(TimeSpan.FromSeconds(5)).ContinueWith(_ => { }, TaskScheduler.Default);
        }
        {
            var (clientSide, filterClient) = await SocketPair.CreateAsync();
            var (filterUp, serverSide) = await SocketPair.CreateAsync();
            var server = new FakeNbdServer(new byte[Size]);
            var serverRun = Task.Run(() => server.RunAsync(serverSide, cts.Token), cts.Token);
            var filter = new NbdSenderFilter();
            var run = Task.Run(() => filter.RunAsync(filterClient, filterUp, new DiskBlockMap(Size), new DiskBlockMap(Size), cts.Token), cts.Token);
            memory = await WriteAllAsync(clientSide, a, cts.Token);
            Assert.True((await run.WaitAsync(cts.Token)).CleanDisconnect);
            Assert.Equal((long)Size, filter.Stats.BytesForwarded);
            Assert.Equal(a.AsSpan(0, Chunk).ToArray(), server.Disk.AsSpan(0, Chunk).ToArray());
            foreach (var st in new[] { clientSide, filterClient, filterUp, serverSide })
                await st.DisposeAsync();
            await serverRun.WaitAsync(TimeSpan.FromSeconds(5)).ContinueWith(_ => { }, TaskScheduler.Default);
        }

        output.WriteLine($"image {Size >> 20} MiB, 1 MiB WRITEs, 16 in flight, 64 KiB blocks, XxHash128");
        output.WriteLine($"direct to qemu-nbd, allocate: {allocate,8:F0} MiB/s");
        output.WriteLine($"direct to qemu-nbd:           {direct,8:F0} MiB/s (overwrite)");
        output.WriteLine($"filter, all blocks changed:   {changed,8:F0} MiB/s (everything forwarded)");
        output.WriteLine($"direct to in-memory server:   {memoryDirect,8:F0} MiB/s");
        output.WriteLine($"filter -> in-memory server:   {memory,8:F0} MiB/s (everything forwarded, no disk)");
        output.WriteLine($"filter, all blocks unchanged: {unchanged,8:F0} MiB/s (everything elided)");
    }

    private static DiskBlockMap MapOf(byte[] pattern)
    {
        var map = new DiskBlockMap(Size);
        for (long block = 0; block < map.BlockCount; block++)
        {
            int at = (int)((block * 65536) % Pattern);
            map.Set(block, DiskBlockHash.Compute(pattern.AsSpan(at, 65536), map.HashKey));
        }
        return map;
    }

    private static async Task<(double MiBps, NbdFilterStats Stats)> ThroughFilterAsync(QemuNbdServer nbd, IDiskBlockView retained, byte[] pattern, CancellationToken ct)
    {
        var (clientSide, filterClient) = await SocketPair.CreateAsync();
        await using var upstream = await nbd.ConnectAsync(ct);
        var filter = new NbdSenderFilter();
        var recorded = new DiskBlockMap(Size);
        var run = Task.Run(() => filter.RunAsync(filterClient, upstream, retained, recorded, ct), ct);
        double rate = await WriteAllAsync(clientSide, pattern, ct);
        var result = await run.WaitAsync(ct);
        Assert.True(result.CleanDisconnect);
        await clientSide.DisposeAsync();
        await filterClient.DisposeAsync();
        return (rate, filter.Stats);
    }

    private static async Task<double> WriteAllAsync(Stream stream, byte[] pattern, CancellationToken ct)
    {
        await using var client = await NbdClient.ConnectAsync(stream, new NbdClientOptions { MaxRequest = 2 * Chunk }, ct);
        using var window = new SemaphoreSlim(16);
        int count = (int)(Size / Chunk);
        var sw = Stopwatch.StartNew();
        var reader = Task.Run(async () =>
        {
            for (int i = 0; i < count; i++)
            {
                var (_, error) = await client.ReadReplyAsync(Memory<byte>.Empty, 0, ct);
                Assert.Equal(0u, error);
                window.Release();
            }
        }, ct);
        for (int i = 0; i < count; i++)
        {
            await window.WaitAsync(ct);
            ulong offset = (ulong)i * Chunk;
            await client.SendRequestAsync(NbdCommand.Write, NbdCommandFlags.None, offset, Chunk, pattern.AsMemory((int)(offset % Pattern), Chunk), ct);
        }
        await reader;
        Assert.Equal(0u, await client.CommandAsync(NbdCommand.Flush, NbdCommandFlags.None, 0, 0, default, ct));
        double seconds = sw.Elapsed.TotalSeconds;
        await client.DisconnectAsync(ct);
        return Size / (1024.0 * 1024.0) / seconds;
    }
}
