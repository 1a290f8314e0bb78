using System.Globalization;
using System.Text.Json;
using Xunit;
using Xunit.Abstractions;

namespace BFMig.Lab.Tests;

/// <summary>
/// The fault matrix (lab/lib/faults.sh): each fault hits a return trip in both directions. One
/// scenario per group: trip 1 A->B, trips 2 (B->A) and 3 (A->B) are normal return trips (the
/// baselines), then per fault two trips, B->A and A->B, each first attempted with the fault and
/// then retried. After every attempt the guest must run on exactly one host with verified data
/// (the lab dies otherwise), every retry is verified, and the retry's bytes are reported. The
/// retry (or the attempt, when it got through despite the fault) must cost at most 1.5 x the
/// normal return trip in the same direction plus what changed since the attempt (nothing: the
/// harness changes no data between an attempt and its retry). Two faults leave nothing to resume
/// from and are bounded by the first trip instead (1.1 x): a full store (the trip must get
/// through, keeping nothing) and a damaged disk map (its disk goes whole).
/// </summary>
[Collection(LabCollection.Name)]
public sealed class FaultMatrixTests(ITestOutputHelper output) : IDisposable
{
    private const double RetryBound = 1.5;
    private const double StockBound = 1.1;
    private readonly LabRunner lab = new(output);
    private readonly string dir = Directory.CreateTempSubdirectory("bfmig-lab-faults-").FullName;

    public void Dispose() => Directory.Delete(dir, recursive: true);

    /// <summary>
    /// What CI runs: every BFMig process on both hosts SIGKILLed mid-trip, in both directions;
    /// the guest must end on exactly one host with verified data and the retry must be verified.
    /// Its cost is printed, not bounded here (CI's machines are too loaded for a cost bound); the
    /// long cases below assert it. A failed memory stream keeps both memory stores minus the pages
    /// it left in doubt (MemoryDoubtJournal), so the retry costs about a normal return trip.
    /// </summary>
    [LabFact]
    public void Representative_KillAll_EndsOnOneHostVerified() => RunMatrix(assertCost: false, "kill-all");

    [LongLabFact]
    public void AbortKillAllDamagedPages_RetryCostBound() => RunMatrix(assertCost: true, "abort", "kill-all", "damage-pages");

    [LongLabFact]
    public void Link_DownFiveSeconds_InMemoryAndDiskPhase() => RunMatrix(assertCost: true, "link5-mem", "link5-disk");

    [LongLabFact]
    public void Link_DownSixtySeconds_InMemoryAndDiskPhase() => RunMatrix(assertCost: true, "link60-mem", "link60-disk");

    [LongLabFact]
    public void Libvirtd_RestartedOnSourceAndDestination() => RunMatrix(assertCost: true, "libvirtd-src", "libvirtd-dst");

    [LongLabFact]
    public void Bfmigd_RestartedOnSourceAndDestination() => RunMatrix(assertCost: true, "bfmigd-src", "bfmigd-dst");

    [LongLabFact]
    public void ReceiverStoreFull_AndDamagedDiskMap() => RunMatrix(assertCost: true, "store-full", "damage-map");

    private void RunMatrix(bool assertCost, params string[] kinds)
    {
        var trips = 3 + (2 * kinds.Length);
        var json = Path.Combine(dir, "faults.json");
        var args = new List<string>
        {
            "scenario", "roundtrip", "--mode", "bfmig", "--json", json, "--rate", "100mbit",
            "--ram-mib", "256", "--fill-mib", "128", "--disk-gib", "1", "--disk-data-mib", "256",
            "--trips", trips.ToString(CultureInfo.InvariantCulture),
        };
        for (int i = 0; i < kinds.Length; i++)
        {
            args.AddRange(["--fault", $"{kinds[i]}@{4 + (2 * i)}", "--fault", $"{kinds[i]}@{5 + (2 * i)}"]);
        }

        // A 60 s link loss in each direction, with the libvirt keepalive and retries around it.
        lab.Run(TimeSpan.FromMinutes(20 + (10 * kinds.Length)), [.. args]);
        using var result = LabRunner.ReadResult(json);
        var list = result.RootElement.GetProperty("trips").EnumerateArray().ToList();
        Assert.Equal(trips, list.Count);
        foreach (var trip in list)
        {
            Assert.True(trip.GetProperty("verified").GetBoolean(), $"trip not verified: {trip}");
            Assert.Equal(0, trip.GetProperty("guest_mismatches").GetInt32());
        }

        // Trip n (1-based) goes B->A when n is even: its baseline is trip 2, else trip 3.
        long Baseline(int n) => list[n % 2 == 0 ? 1 : 2].GetProperty("wire_bytes").GetInt64();
        long firstTrip = list[0].GetProperty("wire_bytes").GetInt64();
        output.WriteLine($"baselines (normal return trips): B->A {Baseline(2)} bytes, A->B {Baseline(3)} bytes");
        var over = new List<string>();
        for (int n = 4; n <= trips; n++)
        {
            var trip = list[n - 1];
            Assert.True(trip.TryGetProperty("fault", out var fault), $"trip {n} has no fault record: {trip}");
            var kind = fault.GetProperty("kind").GetString()!;
            Assert.Equal(kinds[(n - 4) / 2], kind);
            if (fault.GetProperty("attempt").GetBoolean())
            {
                Assert.Equal(0, fault.GetProperty("mismatches").GetInt32());
                Assert.True(
                    fault.GetProperty("injected_after_seconds").ValueKind == JsonValueKind.Number,
                    $"trip {n}: the attempt ended before its phase, {kind} was never injected: {fault}");
            }

            // The trip that carried the guest after the fault: the retry, or the attempt itself when
            // it got through (a damaged store, a short link loss); then the retry follows a
            // return and has nothing left to carry.
            var through = fault.GetProperty("migrate_rc").GetInt32() == 0;
            var retry = trip.GetProperty("wire_bytes").GetInt64();
            var cost = through ? fault.GetProperty("attempt_wire_bytes").GetInt64() : retry;
            // A full store on the receiver is BFMig's own failure: the trip must get through, at
            // no more than stock's cost (it cannot keep what it carries). A damaged map cannot be
            // trusted nor proven (its hashes are the damage): its disk goes whole, as on the first trip.
            bool stockCost = kind is "store-full" or "damage-map";
            if (kind == "store-full")
                Assert.True(through, $"trip {n}: a full store failed the migration instead of falling back to a whole trip: {fault}");
            var bound = stockCost ? (long)(StockBound * firstTrip) : (long)(RetryBound * Baseline(n));
            var line = string.Create(
                CultureInfo.InvariantCulture,
                $"trip {n} {trip.GetProperty("from")}->{trip.GetProperty("to")} after {kind}: {(through ? "the attempt got through" : "the attempt failed")}, the trip that carried the guest moved {cost} bytes = {(double)cost / Baseline(n):0.00} x the normal return trip {Baseline(n)} (bound {(stockCost ? $"{StockBound} x the first trip {firstTrip}" : $"{RetryBound} x")}); retry {retry} bytes in {trip.GetProperty("total_seconds")} s; attempt {fault}");
            output.WriteLine(line);
            if (cost > bound)
            {
                over.Add(line);
            }
        }

        if (assertCost)
            Assert.True(over.Count == 0, $"retries over {RetryBound} x a normal return trip:\n{string.Join('\n', over)}");
        else if (over.Count > 0)
            output.WriteLine($"not asserted in this case (see its summary): {over.Count} retries over {RetryBound} x a normal return trip");
    }
}
