using System.Text.Json;
using Xunit;
using Xunit.Abstractions;

namespace BFMig.Lab.Tests;

/// <summary>
/// <c>lab scenario hostile</c>: host A attacks host B's bfmigd peer port (lab/tools/hostile-peer)
/// before the third trip of a small bfmig round trip, a return to B. That return trip must still
/// be verified and cheap, B's bfmigd the same process and not bigger by more than 16 MiB, and
/// its log rate-limited and escaped.
/// </summary>
[Collection(LabCollection.Name)]
public sealed class HostileTests(ITestOutputHelper output) : IDisposable
{
    private readonly LabRunner lab = new(output);
    private readonly string dir = Directory.CreateTempSubdirectory("bfmig-lab-hostile-").FullName;

    public void Dispose() => Directory.Delete(dir, recursive: true);

    [LabFact]
    public void A_hostile_peer_cannot_stop_a_return_trip_crash_bfmigd_or_flood_its_log()
    {
        var json = Path.Combine(dir, "hostile.json");
        // Exit 0 is the scenario's own verdict; the fields are checked here too, so that a
        // failure says which one.
        var (code, text) = lab.TryRun(TimeSpan.FromMinutes(12), "scenario", "hostile", "--json", json, "--rate", "1gbit",
            "--ram-mib", "256", "--fill-mib", "64", "--disk-gib", "1", "--disk-data-mib", "64");
        Assert.True(File.Exists(json), $"no result file: {text}");
        using var result = LabRunner.ReadResult(json);
        var root = result.RootElement;
        Assert.False(root.TryGetProperty("skipped", out var skipped), $"skipped: {skipped}");
        var trips = root.GetProperty("trips").EnumerateArray().ToList();
        Assert.Equal(3, trips.Count);
        foreach (var trip in trips)
            Assert.True(trip.GetProperty("verified").GetBoolean(), $"trip not verified: {trip}");
        long first = trips[0].GetProperty("wire_bytes").GetInt64(), before = trips[1].GetProperty("wire_bytes").GetInt64(),
            after = trips[2].GetProperty("wire_bytes").GetInt64();
        output.WriteLine($"wire bytes: first {first}, return {before}, return after the attack {after}");
        Assert.True(after * 5 < first, $"the return trip after the attack moved {after} bytes, the first {first}");
        Assert.True(after <= 2 * before + 4 * 1048576, $"the return trip after the attack moved {after} bytes, the one before {before}");

        var hostile = root.GetProperty("hostile");
        var phases = hostile.GetProperty("phases").EnumerateArray().ToDictionary(p => p.GetProperty("phase").GetString()!);
        Assert.Equal(["random", "held", "idle", "tls", "route_lab_guest", "route_unknown_guest", "log_injection"], phases.Keys);
        // B closed the idle connections itself (its hello deadline is 5 s, they were held 8 s).
        var idle = phases["idle"];
        Assert.Equal(idle.GetProperty("opened").GetInt32(), idle.GetProperty("closed_by_peer").GetInt32());
        // A route for a guest B does not expect is closed without an answer.
        Assert.Equal(0, phases["route_lab_guest"].GetProperty("bytes_back").GetInt32());

        var daemon = hostile.GetProperty("bfmigd");
        Assert.True(daemon.GetProperty("same_process").GetBoolean(), $"B's bfmigd restarted: {daemon}");
        Assert.True(daemon.GetProperty("rss_within_16mib").GetBoolean(), $"B's bfmigd grew: {daemon}");
        var log = hostile.GetProperty("log");
        Assert.Equal(0, log.GetProperty("raw_control_lines").GetInt32());
        Assert.Equal(0, log.GetProperty("priority_prefix_lines").GetInt32());
        Assert.True(log.GetProperty("escaped_injections").GetInt32() >= 1, log.ToString());
        Assert.True(log.GetProperty("suppressed_summaries").GetInt32() >= 1, log.ToString());
        Assert.True(code == 0, $"the scenario failed: {text}");
    }
}
