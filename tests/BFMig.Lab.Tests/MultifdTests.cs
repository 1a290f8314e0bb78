using System.Text.Json;
using System.Text.RegularExpressions;
using Xunit;
using Xunit.Abstractions;

namespace BFMig.Lab.Tests;

/// <summary>
/// multifd (<c>virsh migrate --parallel --parallel-connections 2</c>) through BFMig: QEMU
/// connects the main stream and each channel to the same socket (explicit mode) or port
/// (transparent mode), each channel runs through its own helper pair and is coded against the
/// guest's store through its main stream's helper, and the destination's receivers connect the
/// main channel first (QEMU 7.2 takes the first connection for it).
/// Stock multifd (plain, no compression) is measured in the same run for the cost.
/// </summary>
[Collection(LabCollection.Name)]
public sealed partial class MultifdTests(ITestOutputHelper output) : IDisposable
{
    private readonly LabRunner lab = new(output);
    private readonly string dir = Directory.CreateTempSubdirectory("bfmig-lab-test-").FullName;

    public void Dispose() => Directory.Delete(dir, recursive: true);

    private static readonly string[] Small =
        ["--ram-mib", "256", "--fill-mib", "128", "--disk-gib", "1", "--disk-data-mib", "256"];

    /// <summary>
    /// Explicit mode with --parallel: three trips (A->B->A->B) each verified, every channel coded
    /// through its main stream's helper against the guest's store, and each return trip costs at
    /// most 5 % of stock multifd's (the issue's target: a return trip with --parallel costs what
    /// one without does). At these sizes (256 MiB of disk data, so few zero pages in the guest)
    /// trips used to stall until the memory receiver stopped holding back the main stream's last
    /// byte (protocol 4, docs/transfer.md "The multifd stall"): a stall fails a trip here.
    /// </summary>
    [LabFact]
    public void ExplicitMode_WithParallel_IsVerifiedOnEveryTrip_AndAReturnTripCostsAtMostFivePercentOfStockMultifd()
    {
        var stock = Run("stock-multifd", "2");
        var trips = Run("bfmig-multifd", "3");
        var stockReturn = stock[1].GetProperty("wire_bytes").GetInt64();
        for (int i = 1; i < trips.Count; i++)
        {
            var wire = trips[i].GetProperty("wire_bytes").GetInt64();
            output.WriteLine($"bfmig-multifd trip {i + 1}: {wire} wire bytes = {100.0 * wire / stockReturn:0.0} % of stock multifd's return trip ({stockReturn})");
            Assert.True(wire * 20 <= stockReturn, $"trip {i + 1} moved {wire} bytes, stock multifd's return trip {stockReturn}: {trips[i]}");
        }
        AssertChannelsCoded("bfmig-multifd", trips.Count);
    }

    /// <summary>
    /// Transparent mode with --parallel (stock's command line): the channels are intercepted like
    /// the main stream, not sent straight to the peer's QEMU (which, on QEMU 7.2, could then
    /// reach it before the main stream and fail the migration); both trips verified.
    /// </summary>
    [LongLabFact]
    public void TransparentMode_WithParallel_IsVerifiedOnEveryTrip()
    {
        var trips = Run("bfmig-transparent-multifd", "2");
        Assert.Equal(2, trips.Count);
        AssertChannelsCoded("bfmig-transparent-multifd", trips.Count);
    }

    private List<JsonElement> Run(string mode, string tripCount)
    {
        var json = Path.Combine(dir, mode + ".json");
        lab.Run(TimeSpan.FromMinutes(25), ["scenario", "roundtrip", "--mode", mode, "--json", json, "--trips", tripCount, .. Small]);
        Assert.True(File.Exists(json), $"no result file {json}");
        using var result = LabRunner.ReadResult(json);
        var root = result.RootElement;
        Assert.Equal(mode, root.GetProperty("mode").GetString());
        Assert.False(root.TryGetProperty("skipped", out var skipped), $"{mode} skipped: {skipped}");
        var args = root.GetProperty("migrate_args").EnumerateArray().Select(a => a.GetString()).ToList();
        Assert.Contains("--parallel", args);
        var trips = root.GetProperty("trips").EnumerateArray().Select(t => t.Clone()).ToList();
        Assert.Equal(int.Parse(tripCount, System.Globalization.CultureInfo.InvariantCulture), trips.Count);
        foreach (var trip in trips)
        {
            output.WriteLine($"{mode}: {trip.GetProperty("from")} -> {trip.GetProperty("to")}: {trip.GetProperty("wire_bytes")} wire bytes");
            Assert.True(trip.GetProperty("verified").GetBoolean(), $"{mode} trip not verified: {trip}");
            Assert.Equal(0, trip.GetProperty("guest_mismatches").GetInt32());
            Assert.True(trip.GetProperty("images_identical").GetBoolean());
        }
        return trips;
    }

    // Each channel's sending helper logs what the store coding did with it: two channels per
    // trip, each coded through its main stream's helper and carrying pages.
    private void AssertChannelsCoded(string mode, int tripCount)
    {
        var logs = new[] { "a", "b" }
            .Select(h => Path.Combine("/var/tmp", LabRunner.LabName, h, "bfmig", "bfmigd.log"))
            .Where(File.Exists)
            .SelectMany(File.ReadLines)
            .ToList();
        var lines = logs.Where(l => l.Contains("multifd channel", StringComparison.Ordinal)).ToList();
        foreach (var l in lines.TakeLast(2 * tripCount))
            output.WriteLine(l);
        var coded = lines.Select(l => Coded().Match(l)).Count(m => m.Success && m.Groups.Cast<Group>().Skip(1).Sum(g => long.Parse(g.Value, System.Globalization.CultureInfo.InvariantCulture)) > 0);
        // On a failure, what each helper said of its own end too (the lab's logs go with it).
        var ends = logs.Where(l => l.Contains("failed", StringComparison.Ordinal) || l.Contains("error", StringComparison.Ordinal)
            || l.Contains("exit", StringComparison.Ordinal));
        Assert.True(coded >= 2 * tripCount,
            $"{mode}: {coded} multifd channels coded against the store, expected {2 * tripCount}:\n{string.Join('\n', lines)}\nfailures in the logs:\n{string.Join('\n', ends)}");
    }

    [GeneratedRegex(@"multifd channel coded against the store: (\d+) pages elided, (\d+) referenced, (\d+) delta, (\d+) full")]
    private static partial Regex Coded();
}
