using System.Text.Json;

namespace BFMig.Cli.Tests;

/// <summary>status, list, estimate and forget against the fake daemon: text, JSON, errors.</summary>
public sealed class DaemonCommandTests(PrivateBus bus) : CliTestBase(bus)
{
    private static readonly long Departure = new DateTimeOffset(2026, 11, 23, 12, 0, 0, TimeSpan.Zero).ToUnixTimeSeconds();

    [Fact]
    public void Status_text_shows_each_field_readably()
    {
        Daemon.Status["tls"] = true;
        CliResult result = Bfmig("status");
        Assert.Equal(0, result.ExitCode);
        // Values line up after the longest label ("active transfers:") and two spaces.
        Assert.Equal(
        [
            $"{"bfmigd:",-19}running on the bus at {Bus.Address}",
            $"{"host:",-19}hostA",
            $"{"version:",-19}0.1.0",
            $"{"uptime:",-19}1h 2m 5s",
            $"{"peers:",-19}hostB, hostC",
            $"{"active transfers:",-19}1",
            $"{"tls:",-19}yes",
        ], Lines(result.Stdout));
        Assert.Equal(["GetStatus()"], Daemon.Calls);
    }

    [Fact]
    public void Status_json_keeps_the_daemons_keys_and_types()
    {
        // --json is accepted before the command as well as after it.
        JsonElement json = Json(Bfmig("--json", "status"));
        Assert.Equal("hostA", json.GetProperty("host_name").GetString());
        Assert.Equal(["hostB", "hostC"], json.GetProperty("peers").EnumerateArray().Select(p => p.GetString()));
        Assert.Equal(1u, json.GetProperty("active_transfers").GetUInt32());
        Assert.Equal(3725UL, json.GetProperty("uptime_seconds").GetUInt64());
    }

    [Fact]
    public void List_text_shows_where_each_guest_is_with_sizes()
    {
        AddGuests();
        Daemon.Trips.Add(("5f0c1c2e-0000-4000-8000-000000000002", "departure", "accelerated", true, "hostB", "memory through BFMig; vda: network disk (rbd)", Departure));
        CliResult result = Bfmig("list");
        Assert.Equal(0, result.ExitCode);
        string[] lines = Lines(result.Stdout);
        Assert.Equal(3, lines.Length);
        Assert.Matches(@"^GUEST\s+WHERE\s+SINCE\s+GEN\s+MEMORY\s+DISK\s+TOTAL\s+ON DISK\s+AGE\s+UUID\s+LAST TRIP$", lines[0]);
        // Sorted by name; the memory/disk columns depend on the contract's struct (one or two sizes).
        bool twoSizes = Daemon.Contract["ListGuests"].OutSignature == "a(sssstttx)";
        Assert.Matches(twoSizes
            ? @"^db1\s+away at hostB\s+2026-11-23 12:00:00 UTC\s+7\s+2\.0 GiB\s+20\.0 GiB\s+22\.0 GiB\s+-\s+-\s+5f0c1c2e-0000-4000-8000-000000000002\s+departure accelerated, shared storage \(memory only\)$"
            : @"^db1\s+away at hostB\s+2026-11-23 12:00:00 UTC\s+7\s+-\s+-\s+22\.0 GiB\s+-\s+-\s+5f0c1c2e-0000-4000-8000-000000000002\s+departure accelerated, shared storage \(memory only\)$", lines[1]);
        Assert.Matches(twoSizes
            ? @"^vm1\s+here \(from hostB\)\s+-\s+3\s+512\.0 MiB\s+1\.5 GiB\s+2\.0 GiB\s+-\s+-\s+5f0c1c2e-0000-4000-8000-000000000001\s+-$"
            : @"^vm1\s+here \(from hostB\)\s+-\s+3\s+-\s+-\s+2\.0 GiB\s+-\s+-\s+5f0c1c2e-0000-4000-8000-000000000001\s+-$", lines[2]);
    }

    [Fact]
    public void List_json_has_every_field()
    {
        AddGuests();
        Daemon.Trips.Add(("5f0c1c2e-0000-4000-8000-000000000001", "arrival", "bypassed", false, "", "no stream went through BFMig", Departure));
        JsonElement json = Json(Bfmig("list", "--json"));
        JsonElement[] guests = [.. json.GetProperty("guests").EnumerateArray()];
        Assert.Equal(2, guests.Length);
        JsonElement db1 = guests.Single(g => g.GetProperty("name").GetString() == "db1");
        Assert.Equal("5f0c1c2e-0000-4000-8000-000000000002", db1.GetProperty("uuid").GetString());
        Assert.Equal("away", db1.GetProperty("location").GetString());
        Assert.Equal("hostB", db1.GetProperty("peer").GetString());
        Assert.Equal(7UL, db1.GetProperty("generation").GetUInt64());
        Assert.Equal(22UL << 30, db1.GetProperty("retained_bytes").GetUInt64());
        Assert.Equal(Departure, db1.GetProperty("since_unix").GetInt64());
        Assert.Equal("2026-11-23T12:00:00Z", db1.GetProperty("since").GetString());
        if (Daemon.Contract["ListGuests"].OutSignature == "a(sssstttx)")
        {
            Assert.Equal(2UL << 30, db1.GetProperty("memory_bytes").GetUInt64());
            Assert.Equal(20UL << 30, db1.GetProperty("disk_bytes").GetUInt64());
        }
        JsonElement vm1 = guests.Single(g => g.GetProperty("name").GetString() == "vm1");
        Assert.Equal(JsonValueKind.Null, vm1.GetProperty("since").ValueKind);
        Assert.Equal("bypassed", vm1.GetProperty("last_trip").GetProperty("path").GetString());
        Assert.Equal("2026-11-23T12:00:00Z", vm1.GetProperty("last_trip").GetProperty("at").GetString());
        Assert.Equal(JsonValueKind.Null, db1.GetProperty("last_trip").ValueKind);
    }

    [Fact]
    public void List_shows_what_each_guest_occupies_on_disk_its_age_and_the_hosts_total()
    {
        AddGuests();
        long now = DateTimeOffset.UtcNow.ToUnixTimeSeconds();
        Daemon.RetentionLimits = "4096 MiB per host, 90 days";
        Daemon.Costs.Add(("5f0c1c2e-0000-4000-8000-000000000002", 300UL << 20, 2UL << 20, 4096, 8192, now - 3 * 86400 - 7200));
        Daemon.Costs.Add(("5f0c1c2e-0000-4000-8000-000000000001", 100UL << 20, 0, 0, 4096, now - 90));
        string[] lines = Lines(Bfmig("list").Stdout);
        Assert.Equal(4, lines.Length);
        Assert.Matches(@"^db1\s.*\s302\.0 MiB\s+3d 2h 0m\s+5f0c1c2e-0000-4000-8000-000000000002\s", lines[1]);
        Assert.Matches(@"^vm1\s.*\s100\.0 MiB\s+1m [3-5]\ds\s+5f0c1c2e-0000-4000-8000-000000000001\s", lines[2]);
        Assert.Equal("on disk: 402.0 MiB in all (memory stores 400.0 MiB, disk maps 2.0 MiB, checkpoints 4.0 KiB); retention: 4096 MiB per host, 90 days", lines[3]);

        JsonElement json = Json(Bfmig("list", "--json"));
        Assert.Equal("4096 MiB per host, 90 days", json.GetProperty("retention").GetString());
        JsonElement db1 = json.GetProperty("guests").EnumerateArray().Single(g => g.GetProperty("name").GetString() == "db1").GetProperty("on_disk");
        Assert.Equal(300UL << 20, db1.GetProperty("memory_store_bytes").GetUInt64());
        Assert.Equal(2UL << 20, db1.GetProperty("disk_map_bytes").GetUInt64());
        Assert.Equal((300UL << 20) + (2UL << 20) + 4096 + 8192, db1.GetProperty("total_bytes").GetUInt64());
        Assert.InRange(db1.GetProperty("age_seconds").GetUInt64(), 3UL * 86400 + 7200, 3UL * 86400 + 7200 + 60);
        Assert.Equal(Daemon.Costs.Sum(c => (decimal)(c.MemoryStore + c.DiskMaps + c.Checkpoints + c.Other)), json.GetProperty("on_disk_bytes").GetDecimal());
    }

    [Fact]
    public void List_without_guests()
    {
        Assert.Equal("no retained guests\n", Bfmig("list").Stdout);
        Assert.Empty(Json(Bfmig("list", "--json")).GetProperty("guests").EnumerateArray());
    }

    [Fact]
    public void Estimate_text_compares_bfmig_with_stock_and_gives_the_basis()
    {
        CliResult result = Bfmig("estimate", "vm1", "hostB");
        Assert.Equal(0, result.ExitCode);
        Assert.Equal(
        [
            "trip of vm1 to hostB:",
            "        BFMIG     STOCK    SAVED",
            "memory  12.0 MiB  1.0 GiB  98.8%",
            "disk    40.0 MiB  8.0 GiB  99.5%",
            "total   52.0 MiB  9.0 GiB  99.4%",
            "basis: rolling dirty bitmap since departure at generation 3; memory from the last trip",
        ], Lines(result.Stdout));
        Assert.Equal(["Estimate(vm1,hostB)"], Daemon.Calls);
    }

    [Fact]
    public void Estimate_json()
    {
        JsonElement json = Json(Bfmig("estimate", "vm1", "hostB", "--json"));
        Assert.Equal("vm1", json.GetProperty("guest").GetString());
        Assert.Equal("hostB", json.GetProperty("peer").GetString());
        Assert.Equal(12UL << 20, json.GetProperty("memory_bytes").GetUInt64());
        Assert.Equal(40UL << 20, json.GetProperty("disk_bytes").GetUInt64());
        Assert.Equal(52UL << 20, json.GetProperty("total_bytes").GetUInt64());
        Assert.Equal(1UL << 30, json.GetProperty("stock_memory_bytes").GetUInt64());
        Assert.Equal(8UL << 30, json.GetProperty("stock_disk_bytes").GetUInt64());
        Assert.Equal(9UL << 30, json.GetProperty("stock_total_bytes").GetUInt64());
        Assert.StartsWith("rolling dirty bitmap", json.GetProperty("basis").GetString(), StringComparison.Ordinal);
    }

    [Fact]
    public void Daemon_error_is_reported_with_its_name_and_exit_1()
    {
        Daemon.Error = ("org.bfmig.BFMig1.Error.UnknownGuest", "no guest vm9 is known here");
        CliResult result = Bfmig("estimate", "vm9", "hostB");
        Assert.Equal(1, result.ExitCode);
        Assert.Equal("", result.Stdout);
        Assert.Equal("bfmig: no guest vm9 is known here\n", result.Stderr);

        Daemon.Error = ("org.freedesktop.DBus.Error.Failed", "disk full");
        CliResult other = Bfmig("list");
        Assert.Equal(1, other.ExitCode);
        Assert.Equal("bfmig: bfmigd: disk full (org.freedesktop.DBus.Error.Failed)\n", other.Stderr);
    }

    [Fact]
    public void Forget_passes_the_guest_and_confirms()
    {
        CliResult result = Bfmig("forget", "vm1");
        Assert.Equal(0, result.ExitCode);
        Assert.Equal("forgot everything retained for vm1: its next trip sends everything\n", result.Stdout);
        JsonElement json = Json(Bfmig("forget", "5f0c1c2e-0000-4000-8000-000000000001", "--json"));
        Assert.Equal("5f0c1c2e-0000-4000-8000-000000000001", json.GetProperty("guest").GetString());
        Assert.True(json.GetProperty("forgotten").GetBoolean());
        Assert.Equal(["Forget(vm1)", "Forget(5f0c1c2e-0000-4000-8000-000000000001)"], Daemon.Calls);
    }

    [Fact]
    public void Forget_refused_says_it_needs_root()
    {
        Daemon.Error = ("org.freedesktop.DBus.Error.AccessDenied", "Forget changes state: root only");
        CliResult result = Bfmig("forget", "vm1");
        Assert.Equal(1, result.ExitCode);
        Assert.Equal("bfmig: Forget was refused: Forget changes state: root only (state-changing commands need root)\n", result.Stderr);
    }

    private void AddGuests()
    {
        Daemon.Guests.Add(new FakeGuest("5f0c1c2e-0000-4000-8000-000000000001", "vm1", "here", "hostB", 3, 512UL << 20, 1536UL << 20, 0));
        Daemon.Guests.Add(new FakeGuest("5f0c1c2e-0000-4000-8000-000000000002", "db1", "away", "hostB", 7, 2UL << 30, 20UL << 30, Departure));
    }
}
