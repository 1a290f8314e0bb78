using BFMig.Daemon.Guests;
using BFMig.Daemon.Transfers;
using BFMig.Native.Libvirt;
using Microsoft.Extensions.Logging.Abstractions;

namespace BFMig.Daemon.Tests;

/// <summary>The location record's one writer: pending trips, libvirt's confirmation, rollback, and settling after a restart.</summary>
public sealed class GuestSessionTests : IDisposable
{
    private static readonly Guid Uuid = Guid.Parse("5f0c1c2e-0000-4000-8000-00000000beef");
    private readonly DirectoryInfo _dir = Directory.CreateTempSubdirectory("bfmig-session-");
    private readonly GuestStateStore _store;

    public GuestSessionTests() => _store = new GuestStateStore(_dir.FullName);

    public void Dispose() => _dir.Delete(recursive: true);

    private GuestSessions NewDaemon() => new(_store, TimeProvider.System, NullLogger.Instance);

    private async Task<LocationRecord?> SettledAsync(GuestSessions sessions)
    {
        await sessions.IdleAsync().WaitAsync(TimeSpan.FromSeconds(10));
        return _store.ReadLocation(Uuid).Record;
    }

    [Fact]
    public async Task A_failed_arrival_leaves_the_destination_recording_the_guest_as_not_here()
    {
        var sessions = NewDaemon();
        var session = sessions.Get(Uuid, "vm1");
        session.TripStarting(TransferDirection.Receive, "hosta");
        Assert.Equal(new LocationRecord(GuestPlace.Away, "hosta", default, PendingTrip.Arriving, "hosta"), (await SettledAsync(sessions))! with { Since = default });

        session.TripEnded(TransferDirection.Receive, ok: false, "memory: the sender went away");
        var record = await SettledAsync(sessions);
        Assert.Equal((GuestPlace.Away, "hosta", PendingTrip.None), (record!.Place, record.Peer, record.Pending));
        Assert.True(record.MayRunElsewhere, "the split-brain rule must keep refusing a start here");
    }

    [Fact]
    public async Task A_departure_that_switched_to_post_copy_is_not_rolled_back_by_a_stream_that_fails_afterwards()
    {
        var sessions = NewDaemon();
        var session = sessions.Get(Uuid, "vm1");
        session.TripStarting(TransferDirection.Send, "hostb");
        session.PostCopyStarted();
        session.TripEnded(TransferDirection.Send, ok: false, "memory: broken pipe");
        var record = await SettledAsync(sessions);
        Assert.Equal((PendingTrip.Departing, "hostb"), (record!.Pending, record.PendingPeer));
        Assert.True(record.MayRunElsewhere, "the guest runs at the destination: a start here must stay refused");
        session.Departed();
        record = await SettledAsync(sessions);
        Assert.Equal((GuestPlace.Away, "hostb", PendingTrip.None), (record!.Place, record.Peer, record.Pending));

        // The next departure starts without the flag: a failed precopy trip rolls back as before.
        session.RunsHere();
        session.TripStarting(TransferDirection.Send, "hostb");
        session.TripEnded(TransferDirection.Send, ok: false, "memory: broken pipe");
        Assert.Equal(PendingTrip.None, (await SettledAsync(sessions))!.Pending);
    }

    [Fact]
    public async Task An_arrival_whose_streams_ended_but_whose_QEMU_stopped_is_rolled_back_and_a_confirmed_one_is_here()
    {
        _store.WriteLocation(Uuid, new LocationRecord(GuestPlace.Away, "hosta", DateTimeOffset.UtcNow.AddHours(-1)));
        var sessions = NewDaemon();
        var session = sessions.Get(Uuid, "vm1");
        session.TripStarting(TransferDirection.Receive, "hosta");
        session.TripEnded(TransferDirection.Receive, ok: true, "");
        Assert.Equal(PendingTrip.Arriving, (await SettledAsync(sessions))!.Pending);
        session.StoppedHere();
        Assert.Equal((GuestPlace.Away, PendingTrip.None), ((await SettledAsync(sessions))!.Place, (await SettledAsync(sessions))!.Pending));

        session.TripStarting(TransferDirection.Receive, "hosta");
        session.Arrived();
        var record = await SettledAsync(sessions);
        Assert.Equal((GuestPlace.Here, "hosta", PendingTrip.None), (record!.Place, record.Peer, record.Pending));
    }

    [Fact]
    public async Task A_departure_is_pending_until_libvirt_confirms_it_and_a_source_that_runs_again_stays_here()
    {
        var sessions = NewDaemon();
        var session = sessions.Get(Uuid, "vm1");
        session.TripStarting(TransferDirection.Send, "hostb");
        session.TripEnded(TransferDirection.Send, ok: true, "");
        var pending = await SettledAsync(sessions);
        Assert.Equal((GuestPlace.Here, PendingTrip.Departing), (pending!.Place, pending.Pending));
        Assert.True(pending.MayRunElsewhere);

        session.RunsHere();
        Assert.Equal((GuestPlace.Here, PendingTrip.None), ((await SettledAsync(sessions))!.Place, _store.ReadLocation(Uuid).Record!.Pending));

        session.TripStarting(TransferDirection.Send, "hostb");
        session.Departed();
        var away = await SettledAsync(sessions);
        Assert.Equal((GuestPlace.Away, "hostb", PendingTrip.None), (away!.Place, away.Peer, away.Pending));
    }

    [Fact]
    public async Task A_confirmed_trip_takes_the_pending_trips_peer_and_with_none_pending_no_earlier_peer()
    {
        _store.WriteLocation(Uuid, new LocationRecord(GuestPlace.Here, "hosta", DateTimeOffset.UtcNow.AddHours(-1)));
        var sessions = NewDaemon();
        var session = sessions.Get(Uuid, "vm1");
        session.TripStarting(TransferDirection.Send, "hostb");
        session.Departed();
        Assert.Equal((GuestPlace.Away, "hostb"), ((await SettledAsync(sessions))!.Place, (await SettledAsync(sessions))!.Peer));

        // Back here by a migration BFMig did not carry: no pending arrival, so the peer is unknown, not "hostb".
        session.Arrived();
        Assert.Equal((GuestPlace.Here, ""), ((await SettledAsync(sessions))!.Place, (await SettledAsync(sessions))!.Peer));
        session.Departed();
        var away = (await SettledAsync(sessions))!;
        Assert.Equal((GuestPlace.Away, ""), (away.Place, away.Peer));

        IncomingAnnouncement? none = null;
        var refusal = SplitBrainRule.Apply("vm1", "start", "begin", away, null, ref none, DateTimeOffset.UtcNow);
        Assert.NotNull(refusal);
        Assert.Contains("migrated to another host and runs on it", refusal);
        Assert.DoesNotContain("host another host", refusal);
    }

    [Fact]
    public async Task A_failure_of_any_kind_in_queued_work_is_logged_and_the_queue_keeps_running()
    {
        var sessions = NewDaemon();
        var session = sessions.Get(Uuid, "vm1");
        var failed = session.Enqueue(() => throw new InvalidOperationException("a bug"));
        var ran = false;
        _ = session.Enqueue(() => ran = true);
        await sessions.IdleAsync().WaitAsync(TimeSpan.FromSeconds(10));
        Assert.True(failed.IsCompletedSuccessfully, "the tail must not fault");
        Assert.True(ran);
    }

    [Fact]
    public async Task A_location_record_that_cannot_be_read_is_never_overwritten()
    {
        var file = DefaultPaths.LocationFile(_dir.FullName, Uuid);
        Directory.CreateDirectory(Path.GetDirectoryName(file)!);
        var damaged = "{\"location\": \"away\", \"peer\": \"hostb\", \"pending\": \"leaving\"}"u8.ToArray();
        File.WriteAllBytes(file, damaged);
        Assert.NotNull(_store.ReadLocation(Uuid).Problem);

        var sessions = NewDaemon();
        var session = sessions.Get(Uuid, "vm1");
        session.TripStarting(TransferDirection.Receive, "hostb");
        session.Arrived();
        session.TripStarting(TransferDirection.Send, "hostb");
        session.Departed();
        session.RunsHere();
        session.StoppedHere();
        session.Reconcile(LibvirtDomainState.Running);
        await sessions.IdleAsync().WaitAsync(TimeSpan.FromSeconds(10));
        Assert.Equal(damaged, File.ReadAllBytes(file));
    }

    [Theory]
    [InlineData(TransferDirection.Send, LibvirtDomainState.Shutoff, GuestPlace.Away, PendingTrip.None)]
    [InlineData(TransferDirection.Send, LibvirtDomainState.Running, GuestPlace.Here, PendingTrip.None)]
    [InlineData(TransferDirection.Send, LibvirtDomainState.Paused, GuestPlace.Here, PendingTrip.Departing)]
    [InlineData(TransferDirection.Receive, LibvirtDomainState.Running, GuestPlace.Here, PendingTrip.None)]
    [InlineData(TransferDirection.Receive, LibvirtDomainState.Shutoff, GuestPlace.Away, PendingTrip.None)]
    [InlineData(TransferDirection.Receive, LibvirtDomainState.Paused, GuestPlace.Away, PendingTrip.Arriving)]
    // A QEMU that still exists here but neither runs nor is gone settles nothing.
    [InlineData(TransferDirection.Send, LibvirtDomainState.Crashed, GuestPlace.Here, PendingTrip.Departing)]
    [InlineData(TransferDirection.Send, LibvirtDomainState.PmSuspended, GuestPlace.Here, PendingTrip.Departing)]
    [InlineData(TransferDirection.Send, LibvirtDomainState.Shutdown, GuestPlace.Here, PendingTrip.Departing)]
    [InlineData(TransferDirection.Receive, LibvirtDomainState.Crashed, GuestPlace.Away, PendingTrip.Arriving)]
    public async Task After_a_restart_a_pending_trip_is_settled_by_libvirts_real_state(TransferDirection direction, LibvirtDomainState state,
        GuestPlace place, PendingTrip pending)
    {
        var before = NewDaemon();
        before.Get(Uuid, "vm1").TripStarting(direction, "hostb");
        before.Get(Uuid).TripEnded(direction, ok: true, "");
        await SettledAsync(before);

        // A new daemon: nothing in memory, only the record on disk.
        var after = NewDaemon();
        after.ReconcilePending(_ => state, _ => false);
        var record = await SettledAsync(after);
        Assert.Equal((place, pending), (record!.Place, record.Pending));
        Assert.Equal("vm1", _store.Read(Uuid)!.Name);
        if (place == GuestPlace.Away)
            Assert.Equal("hostb", record.Peer);
    }
}
