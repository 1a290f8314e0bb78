using BFMig.Tests.Shared.Nbd;
using BFMig.Transfer.Disk.Nbd;
using BFMig.Transfer.Store;
using Xunit.Abstractions;
using Xunit;

namespace BFMig.Transfer.Tests.Nbd;

/// <summary>libnbd's tools (another client implementation) through the filter: READ with holes and BLOCK_STATUS relayed faithfully.</summary>
[Collection("qemu")]
public sealed class NbdLibnbdClientTests(ITestOutputHelper output)
{
    [Fact]
    public async Task NbdcopyAndNbdinfoReadThroughTheFilter()
    {
        if (!TestEnv.Require(output, "qemu-nbd", "qemu-img", "nbdcopy", "nbdinfo"))
            return;
        using var dir = TestEnv.CreateTempDir();
        string image = dir.File("img.qcow2");
        await Images.CreateRandomQcow2Async(image, 16 << 20, seed: 9, fillFraction: 0.5);
        string expected = dir.File("expected.raw");
        await TestEnv.RunAsync("qemu-img", ["convert", "-q", "-f", "qcow2", "-O", "raw", image, expected]);
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(60));
        await using var nbd = await QemuNbdServer.StartAsync(image, "qcow2", dir.File("up.sock"), ["--cache=none", "--aio=threads"], TimeSpan.FromSeconds(20), cts.Token);
        var retained = await DiskBlockMapBuilder.BuildFromImageAsync(expected, "raw");

        string copy = dir.File("copy.raw");
        await using (var harness = new FilterHarness(dir.File("f1.sock"), async c => await nbd.ConnectAsync(c), retained, cts.Token))
        {
            await TestEnv.RunAsync("nbdcopy", ["--connections=1", $"nbd+unix:///?socket={harness.SocketPath}", copy], timeoutSeconds: 60);
            var result = await harness.Completion.WaitAsync(cts.Token);
            Assert.Equal(NbdHeaderStyle.Structured, result.Style);
            Assert.Equal(0, harness.Filter.Stats.BytesForwarded);
            // Reads change nothing: the map after the trip is the map before it.
            Assert.Equal(retained.ComputeDigest(), harness.Recorded.ComputeDigest());
        }
        Assert.Equal(await File.ReadAllBytesAsync(expected), await File.ReadAllBytesAsync(copy));

        string viaFilter;
        await using (var harness = new FilterHarness(dir.File("f2.sock"), async c => await nbd.ConnectAsync(c), retained, cts.Token))
        {
            viaFilter = await TestEnv.RunAsync("nbdinfo", ["--map", $"nbd+unix:///?socket={harness.SocketPath}"], timeoutSeconds: 60);
            await harness.Completion.WaitAsync(cts.Token);
        }
        string direct = await TestEnv.RunAsync("nbdinfo", ["--map", $"nbd+unix:///?socket={nbd.SocketPath}"], timeoutSeconds: 60);
        output.WriteLine(viaFilter);
        Assert.Contains("data", viaFilter, StringComparison.Ordinal);
        Assert.Contains("hole", viaFilter, StringComparison.Ordinal);
        Assert.Equal(direct, viaFilter);
    }
}
