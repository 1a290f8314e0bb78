using System.Text.Json;
using Xunit;
using Xunit.Abstractions;

namespace BFMig.Lab.Tests;

/// <summary>
/// A guest that travels among three hosts (<c>lab up --hosts 3</c>: A, B and C on a switch
/// namespace, every bfmigd with both others as peers) in transparent mode: A->B->C->A->B->A.
/// Each host's departure state and each sender's view of its receiver go stale while the guest is
/// elsewhere; nothing may be trusted wrongly for that, so every trip must arrive verified (guest
/// checksums and the offline image comparison). Every arrival on a host that still holds a
/// snapshot of the guest is cheap, whichever host it comes from (issue 15): C->A (C never
/// exchanged the guest with A; A offers its page index and its disk map), A->B (B holds its
/// snapshot from B->C) and B->A straight after A->B must each cost a fraction of the first trip.
/// </summary>
[Collection(LabCollection.Name)]
public sealed class ThreeHostTests(ITestOutputHelper output) : IDisposable
{
    private readonly LabRunner lab = new(output);
    private readonly string dir = Directory.CreateTempSubdirectory("bfmig-lab-test-").FullName;

    public void Dispose()
    {
        Directory.Delete(dir, recursive: true);
        // The next test brings up the usual two-host lab; leave no third host behind.
        lab.TryRun(TimeSpan.FromMinutes(5), ["down"]);
    }

    [LabFact]
    public void AGuestTouringThreeHosts_ArrivesVerifiedEverywhere_AndEveryArrivalWhereASnapshotWaitsIsCheap()
    {
        var json = Path.Combine(dir, "three-hosts.json");
        lab.Run(TimeSpan.FromMinutes(30), ["scenario", "roundtrip", "--mode", "bfmig-transparent", "--json", json,
            "--route", "a,b,c,a,b,a", "--rate", "1gbit", "--ram-mib", "256", "--fill-mib", "64", "--disk-gib", "1", "--disk-data-mib", "64"]);
        using var result = LabRunner.ReadResult(json);
        var root = result.RootElement;
        Assert.False(root.TryGetProperty("skipped", out var skipped), $"skipped: {skipped}");
        Assert.Equal(["a", "b", "c", "a", "b", "a"],
            root.GetProperty("scenario").GetProperty("route").EnumerateArray().Select(h => h.GetString()).ToList());
        var trips = root.GetProperty("trips").EnumerateArray().ToList();
        Assert.Equal(["A->B", "B->C", "C->A", "A->B", "B->A"],
            trips.Select(t => $"{t.GetProperty("from").GetString()}->{t.GetProperty("to").GetString()}").ToList());
        foreach (var (trip, index) in trips.Select((t, i) => (t, i)))
        {
            output.WriteLine($"trip {index + 1} {trip.GetProperty("from")}->{trip.GetProperty("to")}: {trip.GetProperty("wire_bytes")} bytes");
            Assert.True(trip.GetProperty("verified").GetBoolean(), $"trip {index + 1} not verified: {trip}");
            Assert.Equal(0, trip.GetProperty("guest_mismatches").GetInt32());
            Assert.True(trip.GetProperty("images_identical").GetBoolean(), $"trip {index + 1}: images differ: {trip}");
        }
        long first = trips[0].GetProperty("wire_bytes").GetInt64();
        long last = trips[^1].GetProperty("wire_bytes").GetInt64();
        long fromC = trips[2].GetProperty("wire_bytes").GetInt64();
        long toB = trips[3].GetProperty("wire_bytes").GetInt64();
        Assert.True(last * 5 < first, $"B->A right after A->B moved {last} bytes against the first trip's {first}");
        Assert.True(fromC * 5 < first, $"C->A, onto A's snapshot from the first trip, moved {fromC} bytes against the first trip's {first}");
        Assert.True(toB * 5 < first, $"A->B, onto B's snapshot from B->C, moved {toB} bytes against the first trip's {first}");
    }
}
