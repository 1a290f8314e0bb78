using System.Globalization;
using System.Text.Json;
using Xunit;
using Xunit.Abstractions;

namespace BFMig.Lab.Tests;

/// <summary>
/// A small round trip through BFMig in explicit mode (bfmigd + bfmig-transfer in both lab hosts,
/// streams over <c>unix:///run/bfmig/PEER/lab-guest.{mig,nbd}</c>), verified exactly like stock.
/// </summary>
[Collection(LabCollection.Name)]
public sealed class BfmigRoundTripTests(ITestOutputHelper output) : IDisposable
{
    private readonly LabRunner lab = new(output);
    private readonly string dir = Directory.CreateTempSubdirectory("bfmig-lab-test-").FullName;

    public void Dispose() => Directory.Delete(dir, recursive: true);

    [LabFact]
    public void BfmigRoundTrip_IsVerified_AndReturnTripsMoveLessThanHalf()
    {
        const int Trips = 3;
        var json = Path.Combine(dir, "bfmig.json");
        lab.Run(
            TimeSpan.FromMinutes(20),
            "scenario", "roundtrip", "--mode", "bfmig", "--json", json, "--rate", "1gbit",
            "--ram-mib", "256", "--fill-mib", "64", "--disk-gib", "1", "--disk-data-mib", "16",
            "--trips", Trips.ToString(CultureInfo.InvariantCulture));
        Assert.True(File.Exists(json), $"no result file {json}");
        using var result = LabRunner.ReadResult(json);
        var root = result.RootElement;

        Assert.Equal("bfmig", root.GetProperty("mode").GetString());
        Assert.False(root.TryGetProperty("skipped", out var skipped), $"bfmig mode skipped: {skipped}");
        // migrate_args are the last trip's; with an odd number of trips that one went A -> B.
        var lastDestination = Trips % 2 == 1 ? "b" : "a";
        var args = root.GetProperty("migrate_args").EnumerateArray().Select(a => a.GetString()).ToList();
        Assert.Equal(
            ["--migrateuri", $"unix:///run/bfmig/{lastDestination}/lab-guest.mig", "--disks-uri", $"unix:///run/bfmig/{lastDestination}/lab-guest.nbd"],
            args);

        var trips = root.GetProperty("trips").EnumerateArray().ToList();
        Assert.Equal(Trips, trips.Count);
        foreach (var trip in trips)
        {
            Assert.True(trip.GetProperty("verified").GetBoolean(), $"trip not verified: {trip}");
            Assert.Equal(0, trip.GetProperty("guest_mismatches").GetInt32());
            Assert.True(trip.GetProperty("images_identical").GetBoolean());
        }

        // bfmig-hook is both hosts' libvirt qemu hook and reached bfmigd there: each trip runs it on
        // the destination (migrate/prepare/start/started) and on the source (stopped/release).
        var bfmig = root.GetProperty("bfmig");
        Assert.Equal("build", bfmig.GetProperty("binaries").GetString());
        Assert.EndsWith("/bfmig-hook", bfmig.GetProperty("hook").GetString());
        foreach (var host in new[] { "a", "b" })
        {
            var calls = bfmig.GetProperty("hook_runs").GetProperty(host).GetProperty("daemon_calls").GetInt32();
            Assert.True(calls >= 4, $"the hook reached bfmigd {calls} times on host {host}, expected at least 4: {bfmig}");
        }

        var first = trips[0].GetProperty("wire_bytes").GetInt64();
        // The first trip carries every random RAM page (64 MiB, incompressible).
        Assert.True(first >= 64L * 1024 * 1024, $"first trip moved too little to have carried the guest: {trips[0]}");
        foreach (var trip in trips.Skip(1))
        {
            var wire = trip.GetProperty("wire_bytes").GetInt64();
            Assert.True(wire * 2 < first, $"return trip moved {wire} bytes, not less than half of the first trip's {first}: {trip}");
        }
    }
}
