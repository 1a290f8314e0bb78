using BFMig.Daemon.Guests;
using BFMig.Daemon.Transfers;
using BFMig.Transfer.Memory;
using Microsoft.Extensions.Logging;

namespace BFMig.Daemon.Tests;

/// <summary>
/// The retention policy on real stores: real memory stores (sparse page files), real disk maps
/// and location records in a temporary state directory, evicted through each guest's session.
/// </summary>
public sealed class RetentionTests : IDisposable
{
    private const long MiB = 1 << 20;
    private static readonly DateTimeOffset Now = new(2026, 12, 4, 12, 0, 0, TimeSpan.Zero);
    private readonly DirectoryInfo _dir = Directory.CreateTempSubdirectory("bfmig-retention-");
    private readonly GuestStateStore _store;
    private readonly FixedTime _time = new();
    private readonly ListLogger _log = new();

    public RetentionTests() => _store = new GuestStateStore(_dir.FullName);

    public void Dispose() => _dir.Delete(recursive: true);

    /// <summary>A guest with <paramref name="pages"/> distinct pages received into its memory store (of a 64 MiB block), a disk map, and its record.</summary>
    private Guid Guest(string name, int pages, TimeSpan age, LocationRecord? record = null)
    {
        var uuid = Guid.NewGuid();
        using (var s = MemoryStore.Open(_dir.FullName, uuid))
        {
            s.BeginTrip([new RamBlockInfo("pc.ram", 64 * MiB)], s.State.Seed, keep: false, buildLocator: false);
            var page = new byte[4096];
            for (int p = 0; p < pages; p++)
            {
                Random.Shared.NextBytes(page);
                s.Put(0, p, page, s.Hash(page));
            }
            s.Commit(1, "hostb", snapshotComplete: true);
        }
        var disk = Path.Combine(_store.GuestDirectory(uuid), "disk");
        Directory.CreateDirectory(disk);
        File.WriteAllBytes(Path.Combine(disk, "vda.map"), new byte[8192]);
        _store.SaveName(uuid, name);
        _store.WriteLocation(uuid, record ?? new LocationRecord(GuestPlace.Away, "hostb", Now - age));
        var when = (Now - age).UtcDateTime;
        foreach (var entry in new DirectoryInfo(_store.GuestDirectory(uuid)).EnumerateFileSystemInfos("*", SearchOption.AllDirectories))
            entry.LastWriteTimeUtc = when;
        return uuid;
    }

    private RetentionKeeper Keeper(RetentionLimits limits, Func<Guid, bool>? busy = null) =>
        new(_store, new GuestSessions(_store, _time, _log), limits, busy ?? (_ => false), _time, _log);

    private static RetentionLimits Limits(long totalMiB = 0, long guestMiB = 0, double days = 0) =>
        new(totalMiB * MiB, guestMiB * MiB, TimeSpan.FromDays(days), TimeSpan.FromHours(1));

    [Fact]
    public void The_cost_counts_the_pages_a_sparse_store_holds_not_the_guests_RAM_size()
    {
        var uuid = Guest("vm1", pages: 256, TimeSpan.FromDays(1));
        var cost = _store.Cost(uuid);
        // 1 MiB of pages plus a 64 MiB x 16 / 4096 = 256 KiB hash index, not 64 MiB.
        Assert.InRange(cost.MemoryStore, 1 * MiB, 3 * MiB);
        Assert.InRange(cost.DiskMaps, 8192, 64 * 1024);
        Assert.Equal(cost.MemoryStore + cost.DiskMaps, cost.Evictable);
        Assert.True(cost.Other > 0, "the location record and name count too");
        Assert.Equal(Now - TimeSpan.FromDays(1), _store.LastChanged(uuid));
    }

    [Fact]
    public async Task The_oldest_guests_go_first_until_the_hosts_total_fits_and_the_records_stay()
    {
        var old = Guest("old", pages: 512, TimeSpan.FromDays(10));
        var middle = Guest("middle", pages: 512, TimeSpan.FromDays(5));
        var young = Guest("young", pages: 512, TimeSpan.FromDays(1));
        long total = new[] { old, middle, young }.Sum(u => _store.Cost(u).Total);
        long limit = total - _store.Cost(old).Evictable / 2;

        var evicted = await Keeper(new RetentionLimits(limit, 0, TimeSpan.Zero, TimeSpan.FromHours(1))).RunPassAsync();

        Assert.Equal([old], evicted.Select(e => e.Uuid));
        Assert.Equal(0, _store.Cost(old).Evictable);
        Assert.False(Directory.Exists(Path.Combine(_store.GuestDirectory(old), "mem")));
        Assert.True(_store.Cost(middle).MemoryStore > 0 && _store.Cost(young).MemoryStore > 0);
        // Still guarded: the record says away at hostb, so a start here is still refused.
        Assert.Equal(GuestPlace.Away, _store.ReadLocation(old).Record!.Place);
        Assert.Equal("old", _store.Read(old)!.Name);
        var line = Assert.Single(_log.Lines, l => l.Contains("evicted"));
        Assert.Contains("guest old", line);
        Assert.Contains("over the limit", line);
        Assert.True(new[] { old, middle, young }.Sum(u => _store.Cost(u).Total) <= limit);
    }

    [Fact]
    public async Task Age_and_per_guest_limits_each_evict_with_their_own_reason()
    {
        var stale = Guest("stale", pages: 16, TimeSpan.FromDays(40));
        var big = Guest("big", pages: 1024, TimeSpan.FromDays(2));
        var fine = Guest("fine", pages: 16, TimeSpan.FromDays(2));

        var evicted = await Keeper(Limits(guestMiB: 2, days: 30)).RunPassAsync();

        Assert.Equal([stale, big], evicted.Select(e => e.Uuid));
        Assert.Contains("unchanged for 40 days", evicted[0].Reason);
        Assert.Contains("per-guest limit of 2 MiB", evicted[1].Reason);
        Assert.True(_store.Cost(fine).MemoryStore > 0);
        Assert.Equal(2, _log.Lines.Count(l => l.Contains("evicted")));
    }

    [Fact]
    public async Task A_guest_with_a_pending_trip_or_running_streams_is_never_evicted()
    {
        var departing = Guest("departing", pages: 64, TimeSpan.FromDays(100),
            new LocationRecord(GuestPlace.Here, "", Now - TimeSpan.FromDays(100), PendingTrip.Departing, "hostb"));
        var streaming = Guest("streaming", pages: 64, TimeSpan.FromDays(100));
        var idle = Guest("idle", pages: 64, TimeSpan.FromDays(100));

        var evicted = await Keeper(Limits(totalMiB: 0, days: 1), busy: u => u == streaming).RunPassAsync();

        Assert.Equal([idle], evicted.Select(e => e.Uuid));
        Assert.True(_store.Cost(departing).MemoryStore > 0);
        Assert.True(_store.Cost(streaming).MemoryStore > 0);
    }

    [Fact]
    public async Task A_trip_that_became_pending_after_the_choice_is_refused_by_the_guests_session()
    {
        var uuid = Guest("vm1", pages: 64, TimeSpan.FromDays(100));
        var sessions = new GuestSessions(_store, _time, _log);
        // The pending trip is queued on the session before the eviction: the session sees it first.
        sessions.Get(uuid, "vm1").TripStarting(TransferDirection.Receive, "hostb");
        var e = await Assert.ThrowsAsync<InvalidOperationException>(() => sessions.Get(uuid).EvictSnapshot());
        Assert.Contains("pending arrival from hostb", e.Message);
        Assert.True(_store.Cost(uuid).MemoryStore > 0);
    }

    [Fact]
    public async Task A_pass_that_fails_is_logged_and_the_next_pass_still_evicts()
    {
        var uuid = Guest("vm1", pages: 64, TimeSpan.FromDays(100));
        // The transfer check fails once (a bug, a state it cannot read): not an I/O error.
        var failures = 1;
        var keeper = Keeper(Limits(days: 1), busy: _ => failures-- > 0 ? throw new InvalidOperationException("a check that failed") : false);

        Assert.Empty(await keeper.RunPassAsync());
        Assert.Contains(_log.Lines, l => l.Contains("retention: the check failed: a check that failed"));
        Assert.True(_store.Cost(uuid).MemoryStore > 0);

        Assert.Equal([uuid], (await keeper.RunPassAsync()).Select(e => e.Uuid));
    }

    [Fact]
    public async Task A_store_a_helper_holds_open_is_left_alone()
    {
        var uuid = Guest("vm1", pages: 64, TimeSpan.FromDays(100));
        using (MemoryStore.Open(_dir.FullName, uuid))
        {
            var evicted = await Keeper(Limits(days: 1)).RunPassAsync();
            Assert.Empty(evicted);
            Assert.Contains(_log.Lines, l => l.Contains("not evicting guest vm1") && l.Contains("in use by a transfer helper"));
        }
        Assert.True(_store.Cost(uuid).MemoryStore > 0);
    }

    [Fact]
    public async Task No_limits_evict_nothing_and_an_evicted_store_opens_empty()
    {
        var uuid = Guest("vm1", pages: 64, TimeSpan.FromDays(1000));
        Assert.Empty(await Keeper(RetentionLimits.None).RunPassAsync());
        Assert.Single(await Keeper(Limits(days: 1)).RunPassAsync());
        using var s = MemoryStore.Open(_dir.FullName, uuid);
        Assert.Equal(0UL, s.State.Generation);
        Assert.Equal(0, s.BlockCount);
    }

    [Fact]
    public void Limits_read_from_the_configuration_with_their_defaults()
    {
        var defaults = Configuration.DaemonConfiguration.Load(Configuration.DaemonConfiguration.Build(null, [], new Dictionary<string, string?>()));
        Assert.Equal(new RetentionLimits(0, 0, TimeSpan.FromDays(90), TimeSpan.FromHours(1)), defaults.Retention);
        var set = Configuration.DaemonConfiguration.Load(Configuration.DaemonConfiguration.Build(null, ["--retention:max_total_mib=4096", "--retention:max_guest_mib=512",
            "--retention:max_age_days=0", "--retention:interval_minutes=5"], new Dictionary<string, string?>()));
        Assert.Equal(new RetentionLimits(4096 * MiB, 512 * MiB, TimeSpan.Zero, TimeSpan.FromMinutes(5)), set.Retention);
        Assert.Equal("4096 MiB per host, 512 MiB per guest", set.Retention.ToString());
        var e = Assert.Throws<Configuration.ConfigurationException>(() => Configuration.DaemonConfiguration.Load(
            Configuration.DaemonConfiguration.Build(null, ["--retention:max_total_mib=-1"], new Dictionary<string, string?>())));
        Assert.Contains("retention:max_total_mib", e.Message);
    }

    private sealed class FixedTime : TimeProvider
    {
        public override DateTimeOffset GetUtcNow() => Now;
    }

    private sealed class ListLogger : ILogger
    {
        public List<string> Lines { get; } = [];

        public IDisposable? BeginScope<TState>(TState state) where TState : notnull => null;

        public bool IsEnabled(LogLevel logLevel) => true;

        public void Log<TState>(LogLevel logLevel, EventId eventId, TState state, Exception? exception, Func<TState, Exception?, string> formatter)
        {
            lock (Lines)
                Lines.Add(formatter(state, exception));
        }
    }
}
