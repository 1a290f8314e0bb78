using System.Text.Json;
using Xunit;
using Xunit.Abstractions;

namespace BFMig.Lab.Tests;

/// <summary>
/// The location record's one writer survives its own death: both daemons are killed between a
/// trip's end and libvirt's confirmation of it (`--kill-unconfirmed`, lab/lib/kill.sh), so neither
/// sees Stopped/Migrated nor Resumed/Migrated. Restarted, they settle the pending trip against
/// libvirt's real state: the guest is refused on the host it left and runs on, and returns
/// normally from, the host it reached.
/// </summary>
[Collection(LabCollection.Name)]
public sealed class UnconfirmedTripTests(ITestOutputHelper output) : IDisposable
{
    private readonly LabRunner lab = new(output);
    private readonly string dir = Directory.CreateTempSubdirectory("bfmig-lab-test-").FullName;

    public void Dispose() => Directory.Delete(dir, recursive: true);

    [LabFact]
    public void DaemonsKilledBeforeLibvirtConfirms_SettleTheTripAfterARestart()
    {
        var json = Path.Combine(dir, "unconfirmed.json");
        lab.Run(TimeSpan.FromMinutes(20),
            "scenario", "roundtrip", "--mode", "bfmig", "--json", json, "--rate", "1gbit",
            "--ram-mib", "256", "--fill-mib", "32", "--disk-gib", "1", "--disk-data-mib", "16", "--trips", "2",
            "--kill-unconfirmed", "2");
        Assert.True(File.Exists(json), $"no result file {json}");
        using var result = LabRunner.ReadResult(json);
        var trips = result.RootElement.GetProperty("trips").EnumerateArray().ToList();
        Assert.Equal(2, trips.Count);
        foreach (var trip in trips)
            Assert.True(trip.GetProperty("verified").GetBoolean(), $"trip not verified: {trip}");
        var kill = trips[1].GetProperty("kill");
        output.WriteLine(kill.ToString());
        Assert.Equal("bfmigd-unconfirmed", kill.GetProperty("what").GetString());

        // Killed before the confirmation: both records still hold the trip as pending.
        Assert.Equal("here departing", Text(kill, "at_kill", "source"));
        Assert.Equal("away arriving", Text(kill, "at_kill", "destination"));
        // Restarted: settled by libvirt's state, with no event seen.
        Assert.Equal("away none", Text(kill, "after_restart", "source"));
        Assert.Equal("here none", Text(kill, "after_restart", "destination"));
        // Refused where it is not, running (data intact) where it is, and its return let in.
        Assert.NotEqual(0, kill.GetProperty("source_start_rc").GetInt32());
        Assert.Contains("refusing to", kill.GetProperty("source_start_output").GetString());
        Assert.Equal("running", kill.GetProperty("destination_state").GetString());
        Assert.Equal(0, kill.GetProperty("destination_mismatches").GetInt32());
        Assert.Equal("here none", Text(kill, "after_return", "source"));
        Assert.Equal("away none", Text(kill, "after_return", "destination"));
    }

    private static string? Text(JsonElement e, string outer, string inner) => e.GetProperty(outer).GetProperty(inner).GetString();
}
