using System.Text.Json;
using Xunit;
using Xunit.Abstractions;

namespace BFMig.Lab.Tests;

/// <summary>
/// Two guests migrating at the same moment through transparent mode, and four trading hosts at once (stock's exact command line,
/// one <c>virsh migrate</c> per guest started together), and <c>--copy-storage-inc</c> of a disk
/// that is a qcow2 overlay on a backing file present on both hosts, in both BFMig modes. Every
/// trip of every guest verified (guest checksums and offline image comparison).
/// </summary>
[Collection(LabCollection.Name)]
public sealed class ConcurrentAndBackingTests(ITestOutputHelper output) : IDisposable
{
    private readonly LabRunner lab = new(output);
    private readonly string dir = Directory.CreateTempSubdirectory("bfmig-lab-test-").FullName;

    public void Dispose() => Directory.Delete(dir, recursive: true);

    private static readonly string[] Small =
        ["--rate", "1gbit", "--ram-mib", "256", "--fill-mib", "64", "--disk-gib", "1", "--disk-data-mib", "16"];

    /// <summary>
    /// lab-guest and lab-guest2 go A->B->A at once in transparent mode: each guest's streams are
    /// told apart (socket inode -> owning QEMU), each arrives verified, each is recorded as
    /// accelerated, and each guest's return trip costs a fraction of its first.
    /// </summary>
    [LabFact]
    public void TwoGuestsAtOnce_InTransparentMode_AreBothVerified_AndBothReturnTripsCheap()
    {
        var root = Run("two-guests.json", "bfmig-transparent", "--guests", "2", "--trips", "2");
        Assert.Equal(2, root.GetProperty("guests").GetInt32());
        Assert.Equal(["--migrateuri", "tcp://198.18.0.1", "--listen-address", "198.18.0.1"],
            root.GetProperty("migrate_args").EnumerateArray().Select(a => a.GetString()).ToList());
        AssertEveryGuestVerified_AndEveryReturnTripCheap(root, ["lab-guest", "lab-guest2"], bothWays: false);
    }

    /// <summary>
    /// Four guests, two on each host, trade places at once in transparent mode (issue 15: guests
    /// arriving together open more incoming streams at once than the handshake slots hold; a
    /// stream refused there failed its migration): every trip of every guest verified, each in its
    /// own direction, each return trip a fraction of the guest's first.
    /// </summary>
    [LabFact]
    public void FourGuestsBothWaysAtOnce_InTransparentMode_AreAllVerified_AndEveryReturnTripCheap()
    {
        var root = Run("four-both-ways.json", "bfmig-transparent", "--guests", "4", "--both-ways", "yes", "--trips", "2");
        Assert.True(root.GetProperty("both_ways").GetBoolean());
        AssertEveryGuestVerified_AndEveryReturnTripCheap(root, ["lab-guest", "lab-guest2", "lab-guest3", "lab-guest4"], bothWays: true);
    }

    private void AssertEveryGuestVerified_AndEveryReturnTripCheap(JsonElement root, string[] names, bool bothWays)
    {
        Assert.Equal(names.Length, root.GetProperty("guests").GetInt32());
        var trips = root.GetProperty("trips").EnumerateArray().ToList();
        Assert.Equal(2, trips.Count);
        var firstWire = new Dictionary<string, long>();
        foreach (var (trip, index) in trips.Select((t, i) => (t, i)))
        {
            Assert.True(trip.GetProperty("verified").GetBoolean(), $"trip {index + 1} not verified: {trip}");
            var guests = trip.GetProperty("guests").EnumerateArray().ToList();
            Assert.Equal(names, guests.Select(g => g.GetProperty("guest").GetString()).ToArray());
            foreach (var (g, position) in guests.Select((g, i) => (g, i)))
            {
                var name = g.GetProperty("guest").GetString()!;
                // Guest 1 (and with both ways every odd one) starts on A; they swap hosts every trip.
                bool fromA = (index % 2 == 0) == (!bothWays || position % 2 == 0);
                Assert.Equal(fromA ? "A" : "B", g.GetProperty("from").GetString());
                Assert.True(g.GetProperty("verified").GetBoolean(), $"{name} on trip {index + 1} not verified: {g}");
                Assert.Equal(0, g.GetProperty("guest_mismatches").GetInt32());
                var source = g.GetProperty("bfmig_trip").GetProperty("source");
                Assert.Equal("accelerated (transparent)", source.GetProperty("path").GetString());
                var wire = g.GetProperty("bfmig_wire_bytes").GetInt64();
                output.WriteLine($"trip {index + 1}: {name} {g.GetProperty("from")}->{g.GetProperty("to")} {wire} bytes through its helpers in {g.GetProperty("total_seconds")} s");
                if (index == 0)
                {
                    Assert.True(wire >= 64L * 1024 * 1024, $"{name}'s first trip moved too little to have carried it: {g}");
                    firstWire[name] = wire;
                }
                else
                {
                    Assert.True(wire * 5 < firstWire[name], $"{name}'s return trip moved {wire} bytes against {firstWire[name]}: not elided? {g}");
                }
            }
        }
        var linkFirst = trips[0].GetProperty("wire_bytes").GetInt64();
        var linkReturn = trips[1].GetProperty("wire_bytes").GetInt64();
        Assert.True(linkReturn * 5 < linkFirst, $"the return trip of every guest moved {linkReturn} bytes on the link against {linkFirst}");
    }

    /// <summary>
    /// --copy-storage-inc with a qcow2 overlay (8 MiB of the guest's 16) on a backing file both
    /// hosts hold: A->B->A->B in explicit and transparent mode, a discard in the top layer between
    /// trips, every trip verified, the backing files unchanged, only the top layer travelling on
    /// the first trip, and the return trips cheap.
    /// </summary>
    [LabTheory]
    [InlineData("bfmig")]
    [InlineData("bfmig-transparent")]
    public void CopyStorageInc_OfAnOverlayOnABackingFile_IsVerifiedBothWays_AndReturnTripsCheap(string mode)
    {
        var root = Run($"inc-{mode}.json", mode, "--copy-storage", "inc", "--backing-top-mib", "8", "--disk-discard-mib", "2", "--trips", "3");
        Assert.Equal("inc", root.GetProperty("scenario").GetProperty("copy_storage").GetString());
        var trips = root.GetProperty("trips").EnumerateArray().ToList();
        Assert.Equal(3, trips.Count);
        foreach (var trip in trips)
        {
            Assert.True(trip.GetProperty("verified").GetBoolean(), $"trip not verified: {trip}");
            Assert.Equal(0, trip.GetProperty("guest_mismatches").GetInt32());
            Assert.True(trip.GetProperty("images_identical").GetBoolean());
            Assert.True(trip.GetProperty("backing").GetProperty("backing_files_intact").GetBoolean(), $"a backing file changed: {trip}");
        }
        Assert.Equal(8L << 20, trips[0].GetProperty("backing").GetProperty("source_top_layer_bytes").GetInt64());
        var first = trips[0].GetProperty("wire_bytes").GetInt64();
        // Memory (64 MiB of random fill) and the 8 MiB top layer, not the 16 MiB of data nor the 1 GiB disk.
        Assert.True(first is > 64L << 20 and < 200L << 20, $"the first trip moved {first} bytes: {trips[0]}");
        for (int i = 1; i < trips.Count; i++)
        {
            var wire = trips[i].GetProperty("wire_bytes").GetInt64();
            output.WriteLine($"{mode} trip {i + 1}: {wire} wire bytes = {100.0 * wire / first:0.0} % of the first trip's {first}");
            Assert.True(wire * 5 < first, $"{mode} trip {i + 1} moved {wire} bytes against the first's {first}: {trips[i]}");
        }
    }

    private JsonElement Run(string file, string mode, params string[] extra)
    {
        var json = Path.Combine(dir, file);
        lab.Run(TimeSpan.FromMinutes(25), ["scenario", "roundtrip", "--mode", mode, "--json", json, .. Small, .. extra]);
        Assert.True(File.Exists(json), $"no result file {json}");
        using var result = LabRunner.ReadResult(json);
        var root = result.RootElement.Clone();
        Assert.Equal(mode, root.GetProperty("mode").GetString());
        Assert.False(root.TryGetProperty("skipped", out var skipped), $"skipped: {skipped}");
        return root;
    }
}
