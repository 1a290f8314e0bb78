using System.Text.Json;
using Xunit;
using Xunit.Abstractions;

namespace BFMig.Lab.Tests;

/// <summary>
/// The first trip, with nothing retained, on OS-like content (<c>--content os</c>: an ext4 file
/// system of this machine's own files, and RAM filled from it through the guest's page cache).
/// Stock sends the disk and the non-zero pages as they are; BFMig compresses both, so on content
/// that compresses as real guests' does its first trip costs far less than stock's (issue 15's
/// goal is 0.6 x; the documented run in docs/lab-results/debian12-os-content is 0.48 x). Both
/// modes in the same test on the same link, every trip verified. The bound here is 0.7 x: the
/// sender picks its codec per frame from measured compressor and link speed, so on two cores
/// shared with a TCG guest and other work it may choose LZ4 for some frames (at load 20 this
/// scenario gave 0.52-0.64 x; at 1 Gbit/s it rightly gave up ratio for time, 0.89 x).
/// </summary>
[Collection(LabCollection.Name)]
public sealed class OsContentTests(ITestOutputHelper output) : IDisposable
{
    private readonly LabRunner lab = new(output);
    private readonly string dir = Directory.CreateTempSubdirectory("bfmig-lab-test-").FullName;

    public void Dispose() => Directory.Delete(dir, recursive: true);

    private static readonly string[] Small =
        ["--rate", "100mbit", "--ram-mib", "256", "--fill-mib", "64", "--disk-gib", "1", "--disk-data-mib", "128",
         "--content", "os", "--trips", "1"];

    [LabFact]
    public void FirstTrip_OnOsLikeContent_CostsFarLessThanStock()
    {
        var stock = FirstTripWire("stock");
        var bfmig = FirstTripWire("bfmig-transparent");
        output.WriteLine($"first trip on OS-like content: stock {stock} bytes, bfmig-transparent {bfmig} bytes = {(double)bfmig / stock:0.000} x stock");
        // Stock carried the 128 MiB file system at least: the content was there to be compressed.
        Assert.True(stock > 128L << 20, $"stock's first trip moved only {stock} bytes");
        Assert.True(bfmig * 10 <= stock * 7, $"BFMig's first trip moved {bfmig} bytes = {(double)bfmig / stock:0.000} x stock's {stock}");
    }

    private long FirstTripWire(string mode)
    {
        var json = Path.Combine(dir, mode + ".json");
        lab.Run(TimeSpan.FromMinutes(20), ["scenario", "roundtrip", "--mode", mode, "--json", json, .. Small]);
        using var result = LabRunner.ReadResult(json);
        var root = result.RootElement;
        Assert.False(root.TryGetProperty("skipped", out var skipped), $"skipped: {skipped}");
        Assert.Equal("os", root.GetProperty("scenario").GetProperty("content").GetString());
        var trip = root.GetProperty("trips")[0];
        Assert.True(trip.GetProperty("verified").GetBoolean(), $"{mode}: trip not verified: {trip}");
        Assert.Equal(0, trip.GetProperty("guest_mismatches").GetInt32());
        return trip.GetProperty("wire_bytes").GetInt64();
    }
}
