using BFMig.Contracts;
using BFMig.Daemon.Logging;
using BFMig.Daemon.Transfers;
using BFMig.Native.Libvirt;
using Microsoft.Extensions.Logging;

namespace BFMig.Daemon.Guests;

/// <summary>
/// The one owner of a guest's location record (<see cref="LocationRecord"/>) and of the order in
/// which its state changes: every change runs on this session's serialized queue, so two events of
/// one guest never interleave and no lock on the record is needed (the helpers never write it).
/// <para>
/// A trip is recorded as pending when its first stream starts; libvirt decides how it ends:
/// Stopped/Migrated here confirms a departure, Resumed/Migrated here confirms an arrival. A trip
/// whose streams failed, a source that runs again, or an incoming QEMU that stopped rolls the
/// pending trip back. A pending trip found after a restart is settled against libvirt's real state
/// (<see cref="Reconcile"/>). Until then the split-brain rule treats a pending departure as
/// possibly elsewhere, which never lets two copies run.
/// </para>
/// </summary>
public sealed class GuestSession
{
    private readonly GuestStateStore _store;
    private readonly TimeProvider _time;
    private readonly ILogger _logger;
    private readonly Lock _gate = new();
    private Task _tail = Task.CompletedTask;

    /// <summary>The pending departure switched to post-copy (only touched on the queue).</summary>
    private bool _postCopy;

    internal GuestSession(Guid uuid, string name, GuestStateStore store, TimeProvider time, ILogger logger)
    {
        Uuid = uuid;
        Name = name;
        _store = store;
        _time = time;
        _logger = logger;
    }

    /// <summary>The guest's UUID.</summary>
    public Guid Uuid { get; }

    /// <summary>The guest's name as last seen.</summary>
    public string Name { get; private set; }

    private string Id => Uuid.ToString("D");

    /// <summary>Completes when everything queued so far has run.</summary>
    public Task Idle
    {
        get
        {
            lock (_gate)
                return _tail;
        }
    }

    /// <summary>Runs <paramref name="work"/> after everything queued before it (never on the caller's thread).</summary>
    public Task Enqueue(Action work)
    {
        lock (_gate)
        {
            _tail = _tail.ContinueWith(_ => Run(work), CancellationToken.None, TaskContinuationOptions.None, TaskScheduler.Default);
            return _tail;
        }
    }

    /// <summary>
    /// Like <see cref="Enqueue"/>, but hands <paramref name="work"/>'s outcome to the caller: its
    /// exception faults the returned task instead of being logged (for API calls that must answer).
    /// </summary>
    public Task Submit(Action work) => Submit(() =>
    {
        work();
        return true;
    });

    /// <summary>Like <see cref="Submit(Action)"/>, with <paramref name="work"/>'s result.</summary>
    public Task<T> Submit<T>(Func<T> work)
    {
        var done = new TaskCompletionSource<T>(TaskCreationOptions.RunContinuationsAsynchronously);
        Enqueue(() =>
        {
            try
            {
                done.SetResult(work());
            }
            catch (Exception e)
            {
                done.SetException(e);
            }
        });
        return done.Task;
    }

    /// <summary>
    /// Why the guest's retained state must not be removed now (a trip libvirt has not confirmed
    /// yet: its streams may still need the store, and its outcome decides where the guest is), or
    /// null when it may. The one rule for <c>bfmig forget</c> and for eviction.
    /// </summary>
    public static string? PendingTripText(LocationRecord? record)
    {
        if (record is not { Pending: not PendingTrip.None } pending)
            return null;
        var peer = pending.PendingPeer.Length == 0 ? "another host" : pending.PendingPeer;
        return pending.Pending == PendingTrip.Departing ? $"a pending departure to {peer}" : $"a pending arrival from {peer}";
    }

    /// <summary>
    /// Evicts the guest's departure snapshot (<see cref="GuestStateStore.Evict"/>) on its queue,
    /// after everything queued before (a settle cannot interleave). Faults with
    /// <see cref="InvalidOperationException"/> while a trip is pending or the record cannot be
    /// read, with <see cref="IOException"/> while a helper holds the store. Returns the bytes freed.
    /// </summary>
    public Task<long> EvictSnapshot() => Submit(() =>
    {
        var (record, problem) = _store.ReadLocation(Uuid);
        if (problem is not null)
            throw new InvalidOperationException($"its location record {problem}");
        if (PendingTripText(record) is { } pending)
            throw new InvalidOperationException($"it has {pending} that libvirt has not confirmed yet");
        return _store.Evict(Uuid);
    });

    private void Run(Action work)
    {
        try
        {
            work();
        }
        catch (Exception e) when (e is not OperationCanceledException)
        {
            // Any failure, not only IO: an escaping one would fault the queue's tail, and every later
            // change of the guest (and the daemon's stop) would see it instead of running.
            DaemonLog.LocationFailed(_logger, Name, Id, "state", e is IOException or UnauthorizedAccessException ? e.Message : e.ToString());
        }
    }

    internal void Rename(string name)
    {
        if (name.Length > 0)
            Name = name;
    }

    /// <summary>A stream of a trip started: the trip is pending from now on (until libvirt confirms or the trip fails).</summary>
    public void TripStarting(TransferDirection direction, string peer) => Enqueue(() =>
    {
        var pending = direction == TransferDirection.Send ? PendingTrip.Departing : PendingTrip.Arriving;
        if (!TryReadForUpdate("a pending trip", out var record))
            return;
        if (record is not null && record.Pending == pending && record.PendingPeer == peer)
            return;
        // No record yet: a departing guest runs here; an arriving one runs at the sender until it has arrived.
        record ??= direction == TransferDirection.Send
            ? new LocationRecord(GuestPlace.Here, "", _time.GetUtcNow())
            : new LocationRecord(GuestPlace.Away, peer, _time.GetUtcNow());
        Write(record with { Pending = pending, PendingPeer = peer });
        DaemonLog.TripPending(_logger, Name, Id, pending == PendingTrip.Departing ? "departure to" : "arrival from", peer);
    });

    /// <summary>
    /// The trip's last stream ended. A failed trip is rolled back now (QEMU fails the migration
    /// without its stream); a successful one stays pending until libvirt says how the migration ended.
    /// </summary>
    public void TripEnded(TransferDirection direction, bool ok, string why)
    {
        if (ok)
            return;
        if (direction == TransferDirection.Send)
        {
            Enqueue(() =>
            {
                // After the switch to post-copy the guest runs at the destination: a stream that
                // ended badly since cannot bring it back. It stays pending (possibly elsewhere)
                // until libvirt says Stopped/Migrated, or the source resumes it.
                if (_postCopy)
                    DaemonLog.PostCopyStreamEnded(_logger, Name, Id, why);
                else if (TryReadForUpdate("a rollback", out var record) && record is not null && record.Pending == PendingTrip.Departing)
                    RollBackNow(record, why);
            });
            return;
        }
        RollBack(PendingTrip.Arriving, why);
    }

    /// <summary>libvirt reported that the pending departure switched to post-copy (Suspended/PostCopy here).</summary>
    public void PostCopyStarted() => Enqueue(() => _postCopy = true);

    /// <summary>Libvirt confirmed the guest arrived here (Resumed/Migrated, or Resumed/PostCopy on the destination), from the pending arrival's peer (<see cref="ConfirmedPeer"/>).</summary>
    public void Arrived() => Enqueue(() =>
    {
        if (!TryReadForUpdate("an arrival", out var record))
            return;
        Settle(GuestPlace.Here, ConfirmedPeer(record, PendingTrip.Arriving, GuestPlace.Here), record);
    });

    /// <summary>Libvirt confirmed the guest left (Stopped/Migrated), for the pending departure's peer (<see cref="ConfirmedPeer"/>).</summary>
    public void Departed() => Enqueue(() =>
    {
        if (!TryReadForUpdate("a departure", out var record))
            return;
        _postCopy = false;
        Settle(GuestPlace.Away, ConfirmedPeer(record, PendingTrip.Departing, GuestPlace.Away), record);
    });

    /// <summary>
    /// The other host of a trip libvirt confirmed: the pending trip's peer, never the peer of some
    /// earlier trip's streams. With no such trip pending, the record's own peer when it already
    /// said <paramref name="place"/> (nothing changed), else "" (unknown: "another host").
    /// </summary>
    private static string ConfirmedPeer(LocationRecord? record, PendingTrip trip, GuestPlace place) =>
        record is null ? "" : record.Pending == trip ? record.PendingPeer : record.Place == place ? record.Peer : "";

    /// <summary>The guest runs here again other than by an arrival (Resumed, or started): a pending departure did not happen.</summary>
    public void RunsHere()
    {
        Enqueue(() => _postCopy = false);
        RollBack(PendingTrip.Departing, "the guest runs here again");
    }

    /// <summary>The guest stopped here other than by a departure: a pending arrival did not happen (the incoming QEMU ended).</summary>
    public void StoppedHere() => RollBack(PendingTrip.Arriving, "the incoming guest stopped here");

    /// <summary>
    /// Settles a pending trip against libvirt's state of the guest here (after a restart or a
    /// reconnect, events may have been missed). Running: it is here. Shut off or undefined: it is
    /// not. Paused (a migration's last phase), any other state of a QEMU that still exists, or
    /// unknown (libvirt unreachable): the events will tell.
    /// </summary>
    public void Reconcile(LibvirtDomainState? state) => Enqueue(() =>
    {
        if (state is null or LibvirtDomainState.Paused || !TryReadForUpdate("libvirt's state after a restart", out var found)
            || found is not { Pending: not PendingTrip.None } record)
            return;
        // Only a QEMU that runs, or none at all, settles a trip. One that exists but is shutting
        // down, crashed (and kept), suspended or in no state is still here: the trip stays pending
        // (the rule keeps refusing a second copy) until libvirt's next event for the guest.
        var runs = state is LibvirtDomainState.Running or LibvirtDomainState.Blocked;
        var gone = state is LibvirtDomainState.Shutoff;
        switch (record.Pending)
        {
            case PendingTrip.Arriving when runs:
                Settle(GuestPlace.Here, record.PendingPeer, record);
                break;
            case PendingTrip.Departing when gone:
                Settle(GuestPlace.Away, record.PendingPeer, record);
                break;
            case PendingTrip.Arriving when gone:
            case PendingTrip.Departing when runs:
                RollBackNow(record, "libvirt's state after a restart: " + state);
                break;
        }
    });

    private void Settle(GuestPlace place, string peer, LocationRecord? record)
    {
        var now = _time.GetUtcNow();
        var since = record is not null && record.Place == place ? record.Since : now;
        Write(new LocationRecord(place, peer, since));
        var peerText = place == GuestPlace.Away ? (peer.Length == 0 ? "" : $" at {peer}") : (peer.Length == 0 ? "" : $" (came from {peer})");
        DaemonLog.LocationRecorded(_logger, Name, Id, LocationRecord.Spell(place), peerText);
    }

    private void RollBack(PendingTrip trip, string why) => Enqueue(() =>
    {
        if (TryReadForUpdate("a rollback", out var record) && record is not null && record.Pending == trip)
            RollBackNow(record, why);
    });

    private void RollBackNow(LocationRecord record, string why)
    {
        Write(record with { Pending = PendingTrip.None, PendingPeer = "" });
        DaemonLog.TripRolledBack(_logger, Name, Id, record.Pending == PendingTrip.Departing ? "departure to" : "arrival from", record.PendingPeer, why,
            LocationRecord.Spell(record.Place) + (record.Place == GuestPlace.Away && record.Peer.Length > 0 ? " at " + record.Peer : ""));
    }

    /// <summary>
    /// Reads the record before changing it. False (logged) when one exists but cannot be read: it
    /// may say away or hold a pending trip, so it is never overwritten unread.
    /// </summary>
    private bool TryReadForUpdate(string change, out LocationRecord? record)
    {
        (record, var problem) = _store.ReadLocation(Uuid);
        if (problem is null)
            return true;
        DaemonLog.LocationUnreadable(_logger, Name, Id, change, problem);
        return false;
    }

    private void Write(LocationRecord record)
    {
        _store.SaveName(Uuid, Name);
        _store.WriteLocation(Uuid, record);
    }
}

/// <summary>The daemon's <see cref="GuestSession"/>s, one per guest UUID, created on first use.</summary>
public sealed class GuestSessions(GuestStateStore store, TimeProvider time, ILogger logger)
{
    private readonly System.Collections.Concurrent.ConcurrentDictionary<Guid, GuestSession> _sessions = new();

    /// <summary>The guest's session (its name is updated when <paramref name="name"/> is known).</summary>
    public GuestSession Get(Guid uuid, string name = "")
    {
        var session = _sessions.GetOrAdd(uuid, u => new GuestSession(u, name.Length > 0 ? name : store.Read(u)?.Name ?? "", store, time, logger));
        session.Rename(name);
        return session;
    }

    /// <summary>Completes when everything queued so far on every session has run.</summary>
    public Task IdleAsync() => Task.WhenAll(_sessions.Values.Select(s => s.Idle));

    /// <summary>
    /// Settles every pending trip against libvirt (<see cref="GuestSession.Reconcile"/>), except for
    /// guests whose streams still run (their trip is not over).
    /// </summary>
    public void ReconcilePending(Func<Guid, LibvirtDomainState?> state, Func<Guid, bool> busy)
    {
        foreach (var uuid in store.Uuids())
        {
            if (!busy(uuid) && store.ReadLocation(uuid).Record is { Pending: not PendingTrip.None })
                Get(uuid).Reconcile(state(uuid));
        }
    }
}
