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

    /// <summary>
    /// Three round trips in a row (six trips): every one verified, and every trip after the first
    /// (each a return to a host that kept what the guest left) cheap against the first.
    /// </summary>
    [LabFact]
    public void ThreeRoundTrips_AreVerified_AndEveryReturnTripIsCheap()
    {
        const int Trips = 6;
        var json = Path.Combine(dir, "bfmig.json");
        lab.Run(
            TimeSpan.FromMinutes(25),
            "scenario", "roundtrip", "--mode", "bfmig", "--json", json, "--rate", "1gbit",
            "--ram-mib", "256", "--fill-mib", "64", "--disk-gib", "1", "--disk-data-mib", "16",
            "--trips", Trips.ToString(CultureInfo.InvariantCulture));
        Assert.True(File.Exists(json), $"no result file {json}");
        using var result = LabRunner.ReadResult(json);
        var root = result.RootElement;

        Assert.Equal("bfmig", root.GetProperty("mode").GetString());
        Assert.False(root.TryGetProperty("skipped", out var skipped), $"bfmig mode skipped: {skipped}");
        // migrate_args are the last trip's; with an even number of trips that one went B -> A.
        var lastDestination = Trips % 2 == 1 ? "b" : "a";
        var args = root.GetProperty("migrate_args").EnumerateArray().Select(a => a.GetString()).ToList();
        Assert.Equal(
            ["--migrateuri", $"unix:///run/bfmig/{lastDestination}/lab-guest.mig", "--disks-uri", $"unix:///run/bfmig/{lastDestination}/lab-guest.nbd"],
            args);

        var trips = root.GetProperty("trips").EnumerateArray().ToList();
        Assert.Equal(Trips, trips.Count);
        AssertAllVerified(trips);

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
        // Each later trip carries 10 % of the RAM data and 1 % of the disk data that changed, plus
        // device state: a few percent of the first. A fifth leaves room for a loaded machine, not
        // for a trip that re-sends what the receiver kept.
        for (int i = 1; i < trips.Count; i++)
        {
            var wire = trips[i].GetProperty("wire_bytes").GetInt64();
            output.WriteLine($"trip {i + 1}: {wire} wire bytes = {100.0 * wire / first:0.0} % of the first trip's {first}");
            Assert.True(wire * 5 < first, $"trip {i + 1} moved {wire} bytes, not less than a fifth of the first trip's {first}: {trips[i]}");
        }
    }

    /// <summary>
    /// Killing a helper or a daemon on either side in the middle of a return trip fails that
    /// migration cleanly (the guest keeps running on the source with its data intact, and not on
    /// the destination), and the next attempt succeeds and is verified. Trip 1 A->B, then one
    /// kill in each of the four return trips.
    /// </summary>
    [LabFact]
    public void KillsInTheMiddleOfReturnTrips_FailCleanly_AndTheNextAttemptIsVerified()
    {
        // A helper notices its daemon's death within 50 ms (ParentWatch); a return trip's memory
        // stream can be over in about half a second here (0.54 s measured for this guest at
        // 1 Gbit/s), so the daemons die as soon as it starts and the helpers 0.1 s into it: a
        // 0.5 s delay raced the stream's end, and the attempt then rightly succeeded.
        string[] kills = ["transfer-send@2:0.1", "transfer-receive@3:0.1", "bfmigd-src@4:0", "bfmigd-dst@5:0"];
        var json = Path.Combine(dir, "kills.json");
        var args = new List<string>
        {
            "scenario", "roundtrip", "--mode", "bfmig", "--json", json, "--rate", "1gbit",
            "--ram-mib", "256", "--fill-mib", "32", "--disk-gib", "1", "--disk-data-mib", "16", "--trips", "5",
        };
        foreach (var k in kills)
            args.AddRange(["--kill", k]);
        lab.Run(TimeSpan.FromMinutes(25), [.. args]);
        Assert.True(File.Exists(json), $"no result file {json}");
        using var result = LabRunner.ReadResult(json);
        var trips = result.RootElement.GetProperty("trips").EnumerateArray().ToList();
        Assert.Equal(5, trips.Count);
        AssertAllVerified(trips);
        Assert.False(trips[0].TryGetProperty("kill", out _), "trip 1 had no kill");
        for (int i = 1; i < trips.Count; i++)
        {
            Assert.True(trips[i].TryGetProperty("kill", out var kill), $"trip {i + 1} has no kill record: {trips[i]}");
            output.WriteLine($"trip {i + 1}: {kill}");
            Assert.Equal(kills[i - 1].Split('@')[0], kill.GetProperty("what").GetString());
            Assert.True(kill.GetProperty("migrate_failed").GetBoolean(), $"the killed attempt did not fail: {kill}");
            Assert.NotEqual(0, kill.GetProperty("migrate_rc").GetInt32());
            Assert.Equal("running", kill.GetProperty("source_state").GetString());
            Assert.NotEqual("running", kill.GetProperty("destination_state").GetString());
            Assert.Equal(0, kill.GetProperty("source_mismatches").GetInt32());
        }
    }

    private static void AssertAllVerified(List<JsonElement> trips)
    {
        foreach (var trip in trips)
        {
            Assert.True(trip.GetProperty("verified").GetBoolean(), $"trip not verified: {trip}");
            Assert.Equal(0, trip.GetProperty("guest_mismatches").GetInt32());
            Assert.True(trip.GetProperty("images_identical").GetBoolean());
        }
    }
}
