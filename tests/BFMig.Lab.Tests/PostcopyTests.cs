using System.Text.Json;
using Xunit;
using Xunit.Abstractions;

namespace BFMig.Lab.Tests;

/// <summary>
/// Issue 15: <c>virsh migrate --postcopy</c> with <c>virsh migrate-postcopy</c> mid-trip, through
/// BFMig's socket URIs (<c>bfmig-postcopy</c>) and through transparent mode
/// (<c>bfmig-transparent-postcopy</c>), on whichever stack the lab runs (Debian 12 here). The lab
/// switches each trip to post-copy during the first precopy pass; the parser stops eliding at the
/// post-copy commands and carries the rest byte for byte. Every trip must be verified (RAM and
/// disk), really have switched (libvirt's Suspended/PostCopy on the source, Resumed/PostCopy on
/// the destination), and leave the source's record "away" with its disk map sealed, so that the
/// return trip's disk is cheap.
/// </summary>
[Collection(LabCollection.Name)]
public sealed class PostcopyTests(ITestOutputHelper output) : IDisposable
{
    private readonly LabRunner lab = new(output);
    private readonly string dir = Directory.CreateTempSubdirectory("bfmig-lab-postcopy-").FullName;

    public void Dispose() => Directory.Delete(dir, recursive: true);

    private static readonly string[] Small =
        ["--rate", "1gbit", "--ram-mib", "256", "--fill-mib", "128", "--disk-gib", "1", "--disk-data-mib", "256"];

    [LabFact]
    public void ExplicitMode_PostcopyTrips_AreCarriedAndVerified_BothWays() => PostcopyTripsAreCarriedAndVerified("bfmig-postcopy");

    [LongLabFact]
    public void TransparentMode_PostcopyTrips_AreCarriedAndVerified_BothWays() => PostcopyTripsAreCarriedAndVerified("bfmig-transparent-postcopy");

    private void PostcopyTripsAreCarriedAndVerified(string mode)
    {
        var json = Path.Combine(dir, mode + ".json");
        string[] hosts = ["a", "b"];
        var before = hosts.Select(DaemonLog).ToArray();
        var printed = lab.Run(TimeSpan.FromMinutes(25), ["scenario", "roundtrip", "--mode", mode, "--json", json, "--trips", "2", .. Small]);
        using var result = LabRunner.ReadResult(json);
        var root = result.RootElement;
        Assert.False(root.TryGetProperty("skipped", out var skipped), $"skipped: {skipped}");
        Assert.Contains("--postcopy", root.GetProperty("migrate_args").EnumerateArray().Select(a => a.GetString()));
        var trips = root.GetProperty("trips").EnumerateArray().ToList();
        Assert.Equal(2, trips.Count);
        foreach (var trip in trips)
        {
            Assert.True(trip.GetProperty("verified").GetBoolean(), $"trip not verified: {trip}");
            Assert.Equal(0, trip.GetProperty("guest_mismatches").GetInt32());
            Assert.True(trip.GetProperty("images_identical").GetBoolean(), $"images differ: {trip}");
        }
        // Both trips asked for the switch while memory was moving ...
        Assert.Equal(2, printed.Split('\n').Count(l => l.Contains("post-copy: migrate-postcopy at", StringComparison.Ordinal)));
        // ... and QEMU did switch: each source paused for post-copy, each destination resumed in it.
        // This run's lines only: a daemon that kept running still holds earlier scenarios' lines (a restarted one starts a new file).
        var logs = hosts.Select((h, i) => DaemonLog(h) is var now && now.StartsWith(before[i], StringComparison.Ordinal) ? now[before[i].Length..] : DaemonLog(h)).ToArray();
        foreach (var log in logs)
        {
            Assert.Contains("Suspended detail 7", log);
            Assert.Contains("Resumed detail 3", log);
        }
        // The departures settled away with the disk carried (sealed for the return trip), never rolled back.
        Assert.DoesNotContain(logs, l => l.Contains("did not happen", StringComparison.Ordinal));
        Assert.Equal(2, logs.Sum(l => l.Split('\n').Count(x => x.Contains("carried through BFMig on this trip", StringComparison.Ordinal) && x.Contains("departure accelerated", StringComparison.Ordinal))));
        var first = trips[0].GetProperty("wire_bytes").GetInt64();
        var second = trips[1].GetProperty("wire_bytes").GetInt64();
        output.WriteLine($"{mode}: trip 1 {first} wire bytes, trip 2 {second} ({100.0 * second / first:0.0} %)");
        // The return trip's 256 MiB of disk data is elided (only what changed travels); memory
        // switched to post-copy early travels whole, so the trip is cheaper but not tiny.
        Assert.True(second * 2 < first, $"the post-copy return trip moved {second} bytes against {first}: was the disk not elided?");
    }

    private static string DaemonLog(string host)
    {
        var path = Path.Combine("/var/tmp", LabRunner.LabName, host, "bfmig", "bfmigd.log");
        return File.Exists(path) ? File.ReadAllText(path) : "";
    }
}
