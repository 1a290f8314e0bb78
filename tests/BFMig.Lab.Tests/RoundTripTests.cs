using System.Text.Json;
using Xunit;
using Xunit.Abstractions;

namespace BFMig.Lab.Tests;

/// <summary>
/// Small stock round trips on the current stack, fast link: every trip verified, and the
/// verifier proven able to fail by corrupting a disk block or a RAM page behind the guest's back.
/// </summary>
[Collection(LabCollection.Name)]
public sealed class RoundTripTests(ITestOutputHelper output) : IDisposable
{
    private const long MiB = 1024 * 1024;
    private readonly LabRunner lab = new(output);
    private readonly string dir = Directory.CreateTempSubdirectory("bfmig-lab-test-").FullName;

    public void Dispose() => Directory.Delete(dir, recursive: true);

    [LabFact]
    public void StockRoundTrip_IsVerifiedOnEveryTrip()
    {
        const int FillMib = 64;
        const int DiskDataMib = 64;
        using var result = RoundTrip("stock", trips: 2, corrupt: "none", fillMib: FillMib, diskDataMib: DiskDataMib);
        var root = result.RootElement;

        Assert.Equal("stock", root.GetProperty("mode").GetString());
        Assert.False(string.IsNullOrEmpty(root.GetProperty("stack").GetProperty("libvirt").GetString()));
        Assert.False(string.IsNullOrEmpty(root.GetProperty("stack").GetProperty("qemu").GetString()));
        var trips = root.GetProperty("trips").EnumerateArray().ToList();
        Assert.Equal(2, trips.Count);
        Assert.Equal(("A", "B"), (trips[0].GetProperty("from").GetString(), trips[0].GetProperty("to").GetString()));
        Assert.Equal(("B", "A"), (trips[1].GetProperty("from").GetString(), trips[1].GetProperty("to").GetString()));
        foreach (var trip in trips)
        {
            Assert.True(trip.GetProperty("verified").GetBoolean(), $"trip not verified: {trip}");
            Assert.Equal(0, trip.GetProperty("guest_mismatches").GetInt32());
            Assert.True(trip.GetProperty("images_identical").GetBoolean());
            // Stock sends all random RAM data and all disk data on every trip.
            Assert.True(trip.GetProperty("wire_bytes").GetInt64() >= (FillMib + DiskDataMib) * MiB, $"too few bytes on the wire: {trip}");
            Assert.True(trip.GetProperty("total_seconds").GetDouble() > 0);
            Assert.True(trip.GetProperty("downtime_ms").GetInt64() > 0, $"no downtime reported: {trip}");
        }
    }

    [LabFact]
    public void CorruptedDiskBlock_IsNotVerified()
    {
        using var result = RoundTrip("stock", trips: 1, corrupt: "disk", fillMib: 32, diskDataMib: 32);
        var trip = result.RootElement.GetProperty("trips")[0];
        Assert.False(trip.GetProperty("verified").GetBoolean());
        Assert.True(trip.GetProperty("guest_mismatches").GetInt32() >= 1, "the guest did not see the changed block");
        Assert.False(trip.GetProperty("images_identical").GetBoolean(), "the image comparison did not see the changed block");
    }

    [LabFact]
    public void CorruptedRamPage_IsNotVerified()
    {
        using var result = RoundTrip("stock", trips: 1, corrupt: "ram", fillMib: 32, diskDataMib: 32);
        var trip = result.RootElement.GetProperty("trips")[0];
        Assert.False(trip.GetProperty("verified").GetBoolean());
        Assert.True(trip.GetProperty("guest_mismatches").GetInt32() >= 1, "the guest did not see the changed page");
        Assert.True(trip.GetProperty("images_identical").GetBoolean(), "the disk was not touched");
    }

    [LabFact]
    public void MultifdZstd_RunsVerifiedOrSkipsWithReason()
    {
        using var result = RoundTrip("stock-multifd-zstd", trips: 1, corrupt: "none", fillMib: 32, diskDataMib: 32);
        var root = result.RootElement;
        if (root.TryGetProperty("skipped", out var reason))
        {
            Assert.Contains("libvirt", reason.GetString(), StringComparison.Ordinal);
            Assert.Empty(root.GetProperty("trips").EnumerateArray());
            return;
        }

        Assert.All(root.GetProperty("trips").EnumerateArray(), t => Assert.True(t.GetProperty("verified").GetBoolean()));
    }

    private JsonDocument RoundTrip(string mode, int trips, string corrupt, int fillMib, int diskDataMib)
    {
        var json = Path.Combine(dir, $"{mode}-{corrupt}.json");
        lab.Run(
            TimeSpan.FromMinutes(15),
            "scenario", "roundtrip", "--mode", mode, "--json", json, "--rate", "1gbit",
            "--ram-mib", "256", "--fill-mib", fillMib.ToString(System.Globalization.CultureInfo.InvariantCulture),
            "--disk-gib", "1", "--disk-data-mib", diskDataMib.ToString(System.Globalization.CultureInfo.InvariantCulture),
            "--trips", trips.ToString(System.Globalization.CultureInfo.InvariantCulture), "--corrupt", corrupt);
        Assert.True(File.Exists(json), $"no result file {json}");
        return LabRunner.ReadResult(json);
    }
}
