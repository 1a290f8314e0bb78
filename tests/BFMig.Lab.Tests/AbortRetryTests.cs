using System.Text.Json;
using Xunit;
using Xunit.Abstractions;

namespace BFMig.Lab.Tests;

/// <summary>
/// Issue 13's case: `virsh domjobabort` on the source 1 s into a return trip, then the same
/// migration again (`--abort`, lab/lib/abort.sh), with the issue's sizes at 100 Mbit/s. The
/// aborted attempt fails cleanly, and the retry costs about what a normal return trip costs,
/// because both hosts keep every block and page the aborted attempt did not leave in doubt.
/// </summary>
[Collection(LabCollection.Name)]
public sealed class AbortRetryTests(ITestOutputHelper output) : IDisposable
{
    private readonly LabRunner lab = new(output);
    private readonly string dir = Directory.CreateTempSubdirectory("bfmig-lab-test-").FullName;

    public void Dispose() => Directory.Delete(dir, recursive: true);

    /// <summary>The issue's sizes (documented in docs/lab-results/abort-retry): about 11 minutes.</summary>
    [LongLabFact]
    public void AReturnTripAbortedOneSecondIn_FailsCleanly_AndItsRetryCostsANormalReturnTrip() =>
        AbortThenRetry("--ram-mib", "512", "--fill-mib", "256", "--disk-gib", "2", "--disk-data-mib", "1024");

    /// <summary>The same on a smaller guest, for CI's budget: the disk still dominates the first trip.</summary>
    [LabFact]
    public void SmallGuest_AReturnTripAbortedOneSecondIn_FailsCleanly_AndItsRetryCostsANormalReturnTrip() =>
        AbortThenRetry("--ram-mib", "256", "--fill-mib", "64", "--disk-gib", "1", "--disk-data-mib", "512");

    private void AbortThenRetry(params string[] size)
    {
        var json = Path.Combine(dir, "abort-retry.json");
        lab.Run(TimeSpan.FromMinutes(40),
            ["scenario", "roundtrip", "--mode", "bfmig", "--json", json, "--rate", "100mbit", .. size,
             "--trips", "3", "--abort", "3:1"]);
        Assert.True(File.Exists(json), $"no result file {json}");
        using var result = LabRunner.ReadResult(json);
        var trips = result.RootElement.GetProperty("trips").EnumerateArray().ToList();
        Assert.Equal(3, trips.Count);
        foreach (var trip in trips)
        {
            Assert.True(trip.GetProperty("verified").GetBoolean(), $"trip not verified: {trip}");
            Assert.Equal(0, trip.GetProperty("guest_mismatches").GetInt32());
            Assert.True(trip.GetProperty("images_identical").GetBoolean());
        }

        // The aborted attempt: failed, the guest runs on the source only, its data intact there.
        var abort = trips[2].GetProperty("abort");
        output.WriteLine($"aborted attempt: {abort}");
        Assert.True(abort.GetProperty("migrate_failed").GetBoolean());
        Assert.Equal("running", abort.GetProperty("source_state").GetString());
        Assert.NotEqual("running", abort.GetProperty("destination_state").GetString());
        Assert.NotEqual("paused", abort.GetProperty("destination_state").GetString());
        Assert.Equal(0, abort.GetProperty("source_mismatches").GetInt32());

        // Trip 2 is the normal return trip (B -> A); trip 3 returns to B again, as the retry of an
        // aborted attempt. Between trips 1 and 2 and between trips 2 and 3 the guest changes the
        // same share of its data, so the normal return trip already carries what changed.
        long normal = trips[1].GetProperty("wire_bytes").GetInt64();
        long retry = trips[2].GetProperty("wire_bytes").GetInt64();
        long first = trips[0].GetProperty("wire_bytes").GetInt64();
        output.WriteLine($"first trip {first} B; normal return {normal} B in {Seconds(trips[1])} s; retry after the abort {retry} B in {Seconds(trips[2])} s ({(double)retry / normal:0.00} x)");
        Assert.True(retry * 2 <= normal * 3, $"the retry moved {retry} bytes, more than 1.5 x the normal return trip's {normal}");
        // And the aborted attempt itself gave up quickly (libvirt's failure did not wait on BFMig).
        Assert.True(abort.GetProperty("attempt_seconds").GetDouble() < 30, $"the aborted attempt took {abort.GetProperty("attempt_seconds")} s to fail");
    }

    private static string Seconds(JsonElement trip) => trip.GetProperty("total_seconds").GetRawText();
}
