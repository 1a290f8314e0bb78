using System.Text.Json;
using Xunit;
using Xunit.Abstractions;

namespace BFMig.Lab.Tests;

/// <summary>
/// Shared storage (<c>--storage shared</c>): the guest's disk is an NBD network disk that both hosts
/// use (qemu-nbd in a third namespace), so every trip moves memory only. BFMig must make the
/// return trips cheap and leave the shared image alone: the persistent bitmap put into it before
/// the trips is there after every trip, and no BFMig process (bfmigd and everything it starts,
/// traced with strace) opens the image for writing or connects to its NBD server. The same on one
/// qcow2 file both hosts see (<c>--storage shared-file</c>, <c>--unsafe</c>), where the image lock is
/// all that stood between the old daemon and the running guest's image.
/// </summary>
[Collection(LabCollection.Name)]
public sealed class SharedStorageTests(ITestOutputHelper output) : IDisposable
{
    private readonly LabRunner lab = new(output);
    private readonly string dir = Directory.CreateTempSubdirectory("bfmig-lab-test-").FullName;

    public void Dispose() => Directory.Delete(dir, recursive: true);

    private static readonly string[] Small =
        ["--rate", "1gbit", "--ram-mib", "256", "--fill-mib", "64", "--disk-gib", "1", "--disk-data-mib", "16", "--trips", "3",
         "--trace-shared", "yes"];

    /// <summary>
    /// Explicit mode: virsh migrate --live --persistent lab-guest qemu+tcp://B/system --migrateuri
    /// unix:///run/bfmig/B/lab-guest.mig, nothing else (no --copy-storage-*, no --unsafe).
    /// </summary>
    [LabFact]
    public void ExplicitMode_MemoryOnly_IsCheap_AndLeavesTheSharedImageAlone()
    {
        var trips = Run("bfmig.json", "bfmig", "virsh", out var root);
        // The last (third) trip went A -> B.
        var args = root.GetProperty("migrate_args").EnumerateArray().Select(a => a.GetString()).ToList();
        Assert.Equal(["--migrateuri", "unix:///run/bfmig/b/lab-guest.mig"], args);
        AssertReturnTripsCheap(trips);
        Assert.All(trips, t => AssertRecorded(t, "accelerated", memoryOnly: true));
    }

    /// <summary>
    /// The set-up of issue 17's report: one qcow2 path both hosts see (<c>--storage shared-file</c>,
    /// cache=none, <c>virsh migrate ... --unsafe</c>), explicit mode. libvirt copies no disk, so
    /// the image the source's bfmigd sees after each departure is the one the guest now runs from:
    /// BFMig must not open it for writing. Before the ImageCustody rule the source's bfmigd ran
    /// <c>qemu-img bitmap --remove</c> on it after every departure (the trace showed 5, 23 and 56
    /// O_RDWR opens of the image after trips 1-3; only QEMU's image lock kept the bitmap).
    /// </summary>
    [LabFact]
    public void ExplicitMode_OnASharedFile_NeverOpensTheImageForWriting()
    {
        var trips = Run("bfmig-file.json", "bfmig", "virsh", out var root, "shared-file");
        Assert.Equal(["--migrateuri", "unix:///run/bfmig/b/lab-guest.mig"], root.GetProperty("migrate_args").EnumerateArray().Select(a => a.GetString()).ToList());
        AssertReturnTripsCheap(trips);
        Assert.All(trips, t => AssertRecorded(t, "accelerated", memoryOnly: true));
    }

    /// <summary>
    /// virt-manager's exact call (virDomainMigrate over two connections, LIVE | PERSIST_DEST |
    /// UNDEFINE_SOURCE, uri tcp://B) with transparent mode: intercepted, the return trips cheap.
    /// </summary>
    [LabFact]
    public void VirtManagersCall_Transparent_IsCheap_AndLeavesTheSharedImageAlone()
    {
        var trips = Run("virt-manager.json", "bfmig-transparent", "virt-manager", out var root);
        Assert.Equal(["--migrateuri", "tcp://198.18.0.2"], root.GetProperty("migrate_args").EnumerateArray().Select(a => a.GetString()).ToList());
        AssertReturnTripsCheap(trips);
        Assert.All(trips, t => AssertRecorded(t, "accelerated (transparent)", memoryOnly: true));
    }

    /// <summary>
    /// The same call with uri none: the destination's libvirt offers its own address (qemu.conf
    /// migration_host) and port, which transparent mode intercepts as well.
    /// </summary>
    [LabFact]
    public void VirtManagersCall_WithoutUri_Transparent_IsCheap_AndLeavesTheSharedImageAlone()
    {
        var trips = Run("virt-manager-nouri.json", "bfmig-transparent", "virt-manager-nouri", out _);
        AssertReturnTripsCheap(trips);
        Assert.All(trips, t => AssertRecorded(t, "accelerated (transparent)", memoryOnly: true));
    }

    /// <summary>
    /// Explicit mode with transparent mode off, and trip 2 made by virt-manager's call without a
    /// URI (<c>--call virsh,virt-manager-nouri,virsh</c>): that trip goes around BFMig at stock cost
    /// and both daemons record it as bypassed (what <c>bfmig list</c> shows); trip 3, through
    /// BFMig again, still sends only the delta against what the destination kept from trip 1.
    /// </summary>
    [LabFact]
    public void ATripAroundBfmig_IsRecordedAsBypassed_AndTheNextTripStillSendsOnlyTheDelta()
    {
        var trips = Run("bypass.json", "bfmig", "virsh,virt-manager-nouri,virsh", out _);
        Assert.Equal(["virsh", "virt-manager-nouri", "virsh"], trips.Select(t => t.GetProperty("call").GetString()).ToList());
        var first = trips[0].GetProperty("wire_bytes").GetInt64();
        var bypassed = trips[1].GetProperty("wire_bytes").GetInt64();
        var after = trips[2].GetProperty("wire_bytes").GetInt64();
        output.WriteLine($"through BFMig {first}, around it {bypassed}, through it again {after} wire bytes");
        AssertRecorded(trips[0], "accelerated", memoryOnly: true);
        AssertRecorded(trips[1], "bypassed", memoryOnly: false);
        Assert.True(bypassed * 2 > first, $"the bypassed trip moved {bypassed} bytes against the first trip's {first}: did it go through BFMig?");
        AssertRecorded(trips[2], "accelerated", memoryOnly: true);
        Assert.True(after * 5 < first, $"the trip after the bypass moved {after} bytes, not less than a fifth of the first's {first}");
    }

    /// <summary>Both daemons' record of the trip (ListTrips, <c>bfmig list</c>'s LAST TRIP).</summary>
    private void AssertRecorded(JsonElement trip, string path, bool memoryOnly)
    {
        var records = trip.GetProperty("bfmig_trip");
        output.WriteLine($"recorded: {records}");
        foreach (var (side, direction) in new[] { ("source", "departure"), ("destination", "arrival") })
        {
            var record = records.GetProperty(side);
            Assert.True(record.ValueKind == JsonValueKind.Object, $"the {side} recorded no trip: {records}");
            Assert.Equal(direction, record.GetProperty("direction").GetString());
            Assert.Equal(path, record.GetProperty("path").GetString());
            Assert.Equal(memoryOnly, record.GetProperty("memory_only").GetBoolean());
        }
    }

    private List<JsonElement> Run(string file, string mode, string call, out JsonElement root, string storage = "shared")
    {
        var json = Path.Combine(dir, file);
        lab.Run(TimeSpan.FromMinutes(15),
            ["scenario", "roundtrip", "--mode", mode, "--call", call, "--json", json, "--storage", storage, .. Small]);
        Assert.True(File.Exists(json), $"no result file {json}");
        using var result = LabRunner.ReadResult(json);
        root = result.RootElement.Clone();
        Assert.Equal(mode, root.GetProperty("mode").GetString());
        Assert.False(root.TryGetProperty("skipped", out var skipped), $"skipped: {skipped}");
        Assert.Equal(call, root.GetProperty("call").GetString());
        Assert.Equal(storage, root.GetProperty("scenario").GetProperty("storage").GetString());
        var trips = root.GetProperty("trips").EnumerateArray().ToList();
        Assert.Equal(3, trips.Count);
        foreach (var trip in trips)
        {
            Assert.True(trip.GetProperty("verified").GetBoolean(), $"trip not verified: {trip}");
            Assert.Equal(0, trip.GetProperty("guest_mismatches").GetInt32());
            AssertSharedImageUntouched(trip);
        }
        return trips;
    }

    /// <summary>
    /// After a trip: the bitmap is still in the image (read with force-share past qemu-nbd's lock),
    /// the traces of both bfmigds show no write access to it, and they did see the daemons open
    /// their own files for writing (a trace that saw nothing would prove nothing).
    /// </summary>
    private void AssertSharedImageUntouched(JsonElement trip)
    {
        var shared = trip.GetProperty("shared");
        output.WriteLine($"{trip.GetProperty("from").GetString()}->{trip.GetProperty("to").GetString()}: {shared}");
        Assert.True(shared.GetProperty("bitmap_kept").GetBoolean(), $"the shared image lost its persistent bitmap: {shared}");
        Assert.Equal(0, shared.GetProperty("bfmig_write_access").GetInt32());
        Assert.True(shared.GetProperty("traced_writes").GetInt32() > 0, $"the bfmigd traces recorded no write access at all: were they attached? {shared}");
    }

    private void AssertReturnTripsCheap(List<JsonElement> trips)
    {
        var first = trips[0].GetProperty("wire_bytes").GetInt64();
        Assert.True(first >= 64L * 1024 * 1024, $"the first trip moved too little to have carried the guest's memory: {trips[0]}");
        for (int i = 1; i < trips.Count; i++)
        {
            var wire = trips[i].GetProperty("wire_bytes").GetInt64();
            output.WriteLine($"trip {i + 1}: {wire} wire bytes = {100.0 * wire / first:0.0} % of the first trip's {first}");
            // Memory only: a return trip carries the pages that changed (a few % of the first);
            // a fifth leaves room for noise, not for a trip at stock cost.
            Assert.True(wire * 5 < first, $"trip {i + 1} moved {wire} bytes, not less than a fifth of the first's {first}: {trips[i]}");
        }
    }
}
