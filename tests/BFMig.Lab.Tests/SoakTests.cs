using Xunit;
using Xunit.Abstractions;

namespace BFMig.Lab.Tests;

/// <summary>
/// The short soak CI runs (lab/lib/soak.sh): two cycles through BFMig with workloads and faults
/// drawn from seed 23 (an abort before trip 3, a restart of the destination's bfmigd before trip
/// 4), every trip verified, bytes and seconds per trip in the JSON. The long documented run is in
/// docs/lab-results/soak/README.md.
/// </summary>
[Collection(LabCollection.Name)]
public sealed class SoakTests(ITestOutputHelper output) : IDisposable
{
    private readonly LabRunner lab = new(output);
    private readonly string dir = Directory.CreateTempSubdirectory("bfmig-lab-soak-").FullName;

    public void Dispose() => Directory.Delete(dir, recursive: true);

    [LabFact]
    public void ShortSoak_WithFaults_EveryTripVerified()
    {
        var json = Path.Combine(dir, "soak.json");
        lab.Run(
            TimeSpan.FromMinutes(30),
            "scenario", "soak", "--json", json, "--cycles", "2", "--seed", "23", "--faults", "yes",
            "--ram-mib", "256", "--fill-mib", "64", "--disk-gib", "1", "--disk-data-mib", "64", "--rate", "1gbit");
        output.WriteLine(lab.Run(TimeSpan.FromMinutes(1), "table", json));
        using var result = LabRunner.ReadResult(json);
        var root = result.RootElement;
        var soak = root.GetProperty("soak");
        Assert.Equal(23, soak.GetProperty("seed").GetInt32());
        var trips = root.GetProperty("trips").EnumerateArray().ToList();
        Assert.Equal(4, trips.Count);
        Assert.Equal(4, soak.GetProperty("trips_verified").GetInt32());
        Assert.Equal(0, soak.GetProperty("mismatches").GetInt32());
        foreach (var trip in trips)
        {
            Assert.True(trip.GetProperty("verified").GetBoolean(), $"trip not verified: {trip}");
            Assert.True(trip.GetProperty("wire_bytes").GetInt64() > 0, $"no bytes measured: {trip}");
            Assert.True(trip.GetProperty("total_seconds").GetDouble() > 0, $"no time measured: {trip}");
        }

        // The seed's draws: every later trip's workload, and the two faults.
        for (int i = 1; i < trips.Count; i++)
        {
            Assert.True(trips[i].TryGetProperty("workload_before", out var w), $"trip {i + 1} has no workload: {trips[i]}");
            output.WriteLine($"trip {i + 1}: workload {w}");
        }

        Assert.Equal("abort", trips[2].GetProperty("fault").GetProperty("kind").GetString());
        Assert.Equal("bfmigd-dst", trips[3].GetProperty("fault").GetProperty("kind").GetString());
    }
}
