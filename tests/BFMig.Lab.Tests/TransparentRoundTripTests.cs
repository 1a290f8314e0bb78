using System.Text.Json;
using Xunit;
using Xunit.Abstractions;

namespace BFMig.Lab.Tests;

/// <summary>
/// Transparent mode in the lab: stock's exact command line (and OpenStack Nova's exact libvirt
/// call) with bfmigd and the hook installed on both hosts, the streams intercepted by the
/// source's nftables redirect; and fail-open when a daemon dies.
/// </summary>
[Collection(LabCollection.Name)]
public sealed class TransparentRoundTripTests(ITestOutputHelper output) : IDisposable
{
    private readonly LabRunner lab = new(output);
    private readonly string dir = Directory.CreateTempSubdirectory("bfmig-lab-test-").FullName;

    public void Dispose() => Directory.Delete(dir, recursive: true);

    private static readonly string[] Small =
        ["--rate", "1gbit", "--ram-mib", "256", "--fill-mib", "64", "--disk-gib", "1", "--disk-data-mib", "16"];

    /// <summary>
    /// virsh migrate --live --persistent --copy-storage-all lab-guest qemu+tcp://B/system
    /// --migrateuri tcp://B --listen-address B, nothing else: A->B->A verified, the return trip cheap.
    /// </summary>
    [LabFact]
    public void StocksCommandLine_GoesThroughBfmig_AndTheReturnTripIsCheap()
    {
        var trips = Run("transparent.json", "virsh", out var root, "--trips", "2");
        var args = root.GetProperty("migrate_args").EnumerateArray().Select(a => a.GetString()).ToList();
        Assert.Equal(["--migrateuri", "tcp://198.18.0.1", "--listen-address", "198.18.0.1"], args);
        AssertReturnTripsCheap(trips);
    }

    /// <summary>
    /// The plainest call: virsh migrate --live --persistent --copy-storage-all lab-guest
    /// qemu+tcp://B/system, no migration URI (the destination offers its qemu.conf migration_host).
    /// </summary>
    [LabFact]
    public void PlainCommandWithoutUri_GoesThroughBfmig_AndTheReturnTripIsCheap()
    {
        var trips = Run("nouri.json", "virsh", out var root, "--trips", "2", "--mode", "bfmig-transparent-nouri");
        Assert.Empty(root.GetProperty("migrate_args").EnumerateArray());
        AssertReturnTripsCheap(trips);
    }

    /// <summary>
    /// OpenStack Nova's call (virDomainMigrateToURI3, migrate_uri tcp://B, migrate_disks vda,
    /// destination and persistent XML, LIVE|PEER2PEER|UNDEFINE_SOURCE|PERSIST_DEST|NON_SHARED_INC):
    /// A->B->A verified, the return trip cheap although UNDEFINE_SOURCE removed the definition
    /// from the host the guest left (what BFMig retained is not tied to it).
    /// </summary>
    [LabFact]
    public void NovasCall_GoesThroughBfmig_AndTheReturnTripIsCheap()
    {
        var trips = Run("nova.json", "nova", out var root, "--trips", "2");
        Assert.Equal("nova", root.GetProperty("call").GetString());
        AssertReturnTripsCheap(trips);
    }

    /// <summary>
    /// Fail-open: (1) the source's bfmigd killed in the middle of a transparent return trip fails
    /// that attempt with the guest running on the source, data verified; (2) with the source's
    /// bfmigd then down (and its table gone, which the lab asserts), the same plain command
    /// succeeds at stock cost; (3) with only the destination's bfmigd down, it succeeds too.
    /// </summary>
    [LabFact]
    public void DeadDaemons_FailOpen_ToStockCost()
    {
        var trips = Run("failopen.json", "virsh", out _, "--trips", "3",
            "--kill", "bfmigd-src@2:0", "--daemon-down", "src@2", "--daemon-down", "dst@3");
        var kill = trips[1].GetProperty("kill");
        Assert.True(kill.GetProperty("migrate_failed").GetBoolean(), $"the attempt with a dead source daemon did not fail: {kill}");
        Assert.Equal("running", kill.GetProperty("source_state").GetString());
        Assert.Equal(0, kill.GetProperty("source_mismatches").GetInt32());
        var first = trips[0].GetProperty("wire_bytes").GetInt64();
        foreach (var (trip, which) in new[] { (trips[1], "src"), (trips[2], "dst") })
        {
            var down = trip.GetProperty("daemon_down");
            Assert.Equal(which, down.GetProperty("which").GetString());
            Assert.False(down.GetProperty("nft_table_left").GetBoolean());
            // Stock cost: the whole guest again (no daemon to elide anything), within noise of the first trip.
            var wire = trip.GetProperty("wire_bytes").GetInt64();
            output.WriteLine($"{which} daemon down: {wire} wire bytes, first trip {first}");
            Assert.True(wire * 2 > first, $"with the {which} daemon down the trip moved only {wire} bytes against {first}: was it elided?");
        }
    }

    /// <summary>
    /// QEMU native TLS (virsh migrate --tls, the lab's own CA) with the daemons intercepting: the
    /// encrypted memory stream is carried byte for byte (nothing can be elided from ciphertext),
    /// both trips succeed and are verified, at stock cost.
    /// </summary>
    [LabFact]
    public void QemuNativeTls_IsCarriedByteForByte_AndVerified()
    {
        var trips = Run("tls.json", "virsh", out var root, "--trips", "2", "--mode", "bfmig-transparent-tls");
        Assert.Equal(["--tls", "--migrateuri", "tcp://198.18.0.1", "--listen-address", "198.18.0.1"],
            root.GetProperty("migrate_args").EnumerateArray().Select(a => a.GetString()).ToList());
        var first = trips[0].GetProperty("wire_bytes").GetInt64();
        var second = trips[1].GetProperty("wire_bytes").GetInt64();
        Assert.True(second * 2 > first, $"a TLS return trip moved {second} bytes against {first}: ciphertext cannot be elided");
    }

    /// <summary>
    /// A rolling upgrade: host B runs a bfmigd and helper of another protocol version
    /// (lab/tools/other-version, this tree with version 999). Stock's command line both ways: each
    /// source's bfmigd asks the peer's which protocol it speaks and carries the streams straight
    /// to the peer's QEMU, so both trips succeed, verified, at stock cost (a helper's stream would
    /// have been refused and the migration failed), and each departure's record says why.
    /// </summary>
    [LabFact]
    public void APeerOfAnotherProtocolVersion_GetsStockCost_NotAFailedMigration()
    {
        var other = Path.Combine(dir, "other-version");
        using (var build = System.Diagnostics.Process.Start(new System.Diagnostics.ProcessStartInfo(
            Path.Combine(LabRunner.RepoRoot, "lab", "tools", "other-version"), [other, "999"])
        {
            RedirectStandardError = true,
        })!)
        {
            var printed = build.StandardError.ReadToEndAsync();
            if (!build.WaitForExit(TimeSpan.FromMinutes(15)))
            {
                // Not left writing into the directory Dispose deletes.
                build.Kill(entireProcessTree: true);
                build.WaitForExit();
                Assert.Fail("lab/tools/other-version did not finish within 15 minutes");
            }
            Assert.True(build.ExitCode == 0, $"lab/tools/other-version failed: {printed.Result}");
        }

        var trips = Run("other-version.json", "virsh", out _, "--trips", "2", "--host-binaries", $"b={other}");
        var first = trips[0].GetProperty("wire_bytes").GetInt64();
        var second = trips[1].GetProperty("wire_bytes").GetInt64();
        Assert.True(second * 2 > first, $"the return trip moved {second} bytes against {first}: it cannot have gone through BFMig");
        string[] expected = ["speaks protocol 999, this one ", "speaks protocol "];
        for (int i = 0; i < 2; i++)
        {
            Assert.True(trips[i].TryGetProperty("bfmig_trip", out var records) && records.ValueKind == JsonValueKind.Object,
                $"trip {i + 1} has no bfmig_trip records: {trips[i]}");
            var source = records.GetProperty("source");
            var reason = source.GetProperty("reason").GetString();
            Assert.Equal("bypassed", source.GetProperty("path").GetString());
            Assert.StartsWith("transparent mode carried the memory stream at stock cost: ", reason, StringComparison.Ordinal);
            Assert.Contains(expected[i], reason, StringComparison.Ordinal);
        }
        Assert.EndsWith(", this one 999", trips[1].GetProperty("bfmig_trip").GetProperty("source").GetProperty("reason").GetString(), StringComparison.Ordinal);
    }

    private List<JsonElement> Run(string file, string call, out JsonElement root, params string[] extra)
    {
        var json = Path.Combine(dir, file);
        var mode = extra.Contains("--mode") ? extra[Array.IndexOf(extra, "--mode") + 1] : "bfmig-transparent";
        extra = [.. extra.Where((a, i) => a != "--mode" && (i == 0 || extra[i - 1] != "--mode"))];
        lab.Run(TimeSpan.FromMinutes(25),
            ["scenario", "roundtrip", "--mode", mode, "--call", call, "--json", json, .. Small, .. extra]);
        Assert.True(File.Exists(json), $"no result file {json}");
        using var result = LabRunner.ReadResult(json);
        root = result.RootElement.Clone();
        Assert.Equal(mode, root.GetProperty("mode").GetString());
        Assert.False(root.TryGetProperty("skipped", out var skipped), $"skipped: {skipped}");
        var trips = root.GetProperty("trips").EnumerateArray().ToList();
        foreach (var trip in trips)
        {
            Assert.True(trip.GetProperty("verified").GetBoolean(), $"trip not verified: {trip}");
            Assert.Equal(0, trip.GetProperty("guest_mismatches").GetInt32());
        }
        return trips;
    }

    private void AssertReturnTripsCheap(List<JsonElement> trips)
    {
        var first = trips[0].GetProperty("wire_bytes").GetInt64();
        Assert.True(first >= 64L * 1024 * 1024, $"the first trip moved too little to have carried the guest: {trips[0]}");
        for (int i = 1; i < trips.Count; i++)
        {
            var wire = trips[i].GetProperty("wire_bytes").GetInt64();
            output.WriteLine($"trip {i + 1}: {wire} wire bytes = {100.0 * wire / first:0.0} % of the first trip's {first}");
            // An intercepted return trip carries what changed (a few % of the first); a fifth leaves
            // room for a loaded machine, not for a trip that went around BFMig at stock cost.
            Assert.True(wire * 5 < first, $"trip {i + 1} moved {wire} bytes, not less than a fifth of the first's {first}: not intercepted? {trips[i]}");
        }
    }
}
