using System.Text.Json;
using Xunit;
using Xunit.Abstractions;

namespace BFMig.Lab.Tests;

/// <summary>
/// The first trip, with nothing retained, on OS-like content (<c>--content os</c>: an ext4 file
/// system of this machine's own files, and RAM filled from it through the guest's page cache).
/// Stock sends the disk and the non-zero pages as they are; BFMig compresses both, so on content
/// that compresses as real guests' does its first trip must cost at most 0.6 x stock's bytes
/// (issue 15's goal). Both modes in the same test on the same link, every trip verified.
/// </summary>
[Collection(LabCollection.Name)]
public sealed class OsContentTests(ITestOutputHelper output) : IDisposable
{
    private readonly LabRunner lab = new(output);
    private readonly string dir = Directory.CreateTempSubdirectory("bfmig-lab-test-").FullName;

    public void Dispose() => Directory.Delete(dir, recursive: true);

    private static readonly string[] Small =
        ["--rate", "1gbit", "--ram-mib", "256", "--fill-mib", "64", "--disk-gib", "1", "--disk-data-mib", "128",
         "--content", "os", "--trips", "1"];

    [LabFact]
    public void FirstTrip_OnOsLikeContent_CostsAtMostSixTenthsOfStock()
    {
        var stock = FirstTripWire("stock");
        var bfmig = FirstTripWire("bfmig-transparent");
        output.WriteLine($"first trip on OS-like content: stock {stock} bytes, bfmig-transparent {bfmig} bytes = {(double)bfmig / stock:0.000} x stock");
        // Stock carried the 128 MiB file system at least: the content was there to be compressed.
        Assert.True(stock > 128L << 20, $"stock's first trip moved only {stock} bytes");
        Assert.True(bfmig * 10 <= stock * 6, $"BFMig's first trip moved {bfmig} bytes = {(double)bfmig / stock:0.000} x stock's {stock}");
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
