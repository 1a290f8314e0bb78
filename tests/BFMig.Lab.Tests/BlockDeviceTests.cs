using System.Text.Json;
using Xunit;
using Xunit.Abstractions;

namespace BFMig.Lab.Tests;

/// <summary>
/// Block devices (<c>--storage block</c>): each host's guest disk is a loop device, the guest's
/// <c>&lt;disk type='block'&gt;</c>, copied with <c>--copy-storage-all</c>. A block device's
/// timestamps do not move when it is written, so no identity proves the retained device; the
/// receiver re-hashes it before each return trip and only blocks proven equal are elided. Between
/// the trips 4 MiB of the device left behind are written behind BFMig's back (qemu-io on the
/// device, <c>--touch-retained-mib</c>): the re-hash must find exactly those 64 blocks, the trip
/// must put them back (images identical), and the return trips must still cost at most 5 % of the
/// first trip's bytes (stock sends the whole disk every trip: more than the first trip).
/// </summary>
[Collection(LabCollection.Name)]
public sealed class BlockDeviceTests(ITestOutputHelper output) : IDisposable
{
    private readonly LabRunner lab = new(output);
    private readonly string dir = Directory.CreateTempSubdirectory("bfmig-lab-test-").FullName;

    public void Dispose() => Directory.Delete(dir, recursive: true);

    private static readonly string[] Small =
        ["--rate", "100mbit", "--ram-mib", "256", "--fill-mib", "64", "--disk-gib", "1", "--disk-data-mib", "256", "--trips", "3",
         "--storage", "block", "--touch-retained-mib", "4"];

    [LabFact]
    public void ReturnTrips_OnBlockDevices_AreReHashedExact_AndCostAtMostFivePercentOfTheFirst()
    {
        var json = Path.Combine(dir, "bfmig.json");
        lab.Run(TimeSpan.FromMinutes(30), ["scenario", "roundtrip", "--mode", "bfmig", "--json", json, .. Small]);
        using var result = LabRunner.ReadResult(json);
        var root = result.RootElement;
        Assert.False(root.TryGetProperty("skipped", out var skipped), $"skipped: {skipped}");
        Assert.Equal("block", root.GetProperty("scenario").GetProperty("storage").GetString());
        var trips = root.GetProperty("trips").EnumerateArray().ToList();
        Assert.Equal(3, trips.Count);
        foreach (var trip in trips)
        {
            Assert.True(trip.GetProperty("verified").GetBoolean(), $"trip not verified: {trip}");
            Assert.Equal(0, trip.GetProperty("guest_mismatches").GetInt32());
            Assert.True(trip.GetProperty("images_identical").GetBoolean(), $"images differ: {trip}");
        }
        long first = Wire(trips[0]);
        output.WriteLine($"block devices: first trip {first} bytes, returns {Wire(trips[1])} ({100.0 * Wire(trips[1]) / first:0.00} %), {Wire(trips[2])} ({100.0 * Wire(trips[2]) / first:0.00} %)");
        // The first trip carried the 256 MiB of data at least.
        Assert.True(first > 256L << 20, $"first trip moved only {first} bytes");
        foreach (var trip in trips.Skip(1))
            Assert.True(Wire(trip) * 20 <= first, $"a return trip moved {Wire(trip)} bytes = {100.0 * Wire(trip) / first:0.00} % of the first trip's {first}");

        // Each return re-hashed the device left there, written behind BFMig's back before each: exactly those blocks differed.
        var rehashed = new[] { "a", "b" }
            .Select(h => Path.Combine("/var/tmp", LabRunner.LabName, h, "bfmig", "bfmigd.log"))
            .Where(File.Exists)
            .SelectMany(File.ReadLines)
            .Where(l => l.Contains("bfmig-transfer: re-hashed /var/lib/libvirt/images/lab-guest.blk: 1024 MiB read", StringComparison.Ordinal))
            .ToList();
        foreach (var line in rehashed.TakeLast(2))
            output.WriteLine(line);
        Assert.True(rehashed.Count >= 2, $"{rehashed.Count} re-hashes logged, expected one per return trip");
        Assert.All(rehashed.TakeLast(2), l => Assert.Contains("; 64 blocks in 1 ranges of 16384 known blocks differ", l));
    }

    private static long Wire(JsonElement trip) => trip.GetProperty("wire_bytes").GetInt64();
}
