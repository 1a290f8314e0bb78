using System.Diagnostics;
using System.Globalization;
using System.Net;
using System.Net.Sockets;
using BFMig.Contracts;
using BFMig.Daemon.Api;
using BFMig.Daemon.Checkpoints;
using BFMig.Daemon.Configuration;
using BFMig.Daemon.Guests;
using BFMig.Daemon.Logging;
using BFMig.Daemon.Sockets;
using BFMig.Daemon.Transfers;
using BFMig.Daemon.Transparent;
using BFMig.Native;
using BFMig.Native.Libvirt;
using BFMig.Native.Linux;
using BFMig.Transfer;
using BFMig.Transfer.Disk;
using BFMig.Transfer.Store;
using BFMig.Transfer.Wire;
using Microsoft.Extensions.Logging;

namespace BFMig.Daemon;

/// <summary>bfmigd, following libvirt: lifecycle events go to the guest's <see cref="GuestSession"/>, the sockets, the checkpoints and the trip record.</summary>
public sealed partial class BfmigDaemon
{
    // ---- libvirt ----

    void IGuestEvents.Reconcile(IReadOnlyCollection<(Guid Uuid, string Name)> running)
    {
        _socketAudit.Reset();
        _sockets?.Reconcile(running);
        foreach (var (uuid, _) in running)
            RefreshDomainXml(uuid);
        // Events may have been missed (a restart, a lost connection): libvirt's state settles pending trips.
        if (_libvirt is { } libvirt)
            _sessions.ReconcilePending(libvirt.GetState, uuid => _transfers?.IsBusy(uuid) == true);
    }

    bool IGuestEvents.Audit(IReadOnlyCollection<(Guid Uuid, string Name)> running)
    {
        if (_sockets is not { } sockets || Volatile.Read(ref _stopping) != 0)
            return true;
        // Only the sockets are compared, and only the guests that differ are corrected: they are
        // what a missed event leaves visibly wrong (a guest no migration can take through BFMig, or
        // a name answered for a guest that is gone); pending trips are libvirt's to settle.
        var (missing, stale, pending) = _socketAudit.Compare(
            running.Where(g => MigrationSockets.IsUsableName(g.Name)), sockets.Serving, Environment.TickCount64);
        if (missing.Count + stale.Count > 0)
        {
            DaemonLog.GuestsOutOfStep(_logger, (int)_socketAudit.Confirm.TotalSeconds, Names(missing), Names(stale));
            foreach (var (uuid, _) in stale)
                sockets.Remove(uuid);
            foreach (var (uuid, name) in missing)
            {
                sockets.Ensure(uuid, name);
                RefreshDomainXml(uuid);
            }
        }
        return !pending;

        static string Names(List<(Guid Uuid, string Name)> guests)
        {
            var all = guests.Select(g => g.Name).Order(StringComparer.Ordinal).ToList();
            return all.Count == 0 ? "none" : string.Join(", ", all.Take(5)) + (all.Count > 5 ? $" and {all.Count - 5} more" : "");
        }
    }

    void IGuestEvents.OnEvent(LibvirtDomainEvent domainEvent) => OnEvent(domainEvent);

    /// <summary>Handles one libvirt event (public so that tests can replay what the test driver cannot produce).</summary>
    public void OnEvent(LibvirtDomainEvent domainEvent)
    {
        if (!Guid.TryParse(domainEvent.DomainUuid, out var uuid))
            return;
        var name = domainEvent.DomainName;
        switch (domainEvent)
        {
            case LibvirtLifecycleDomainEvent e:
                DaemonLog.LifecycleEvent(_logger, name, domainEvent.DomainUuid, e.Event.ToString(), e.Detail);
                var session = _sessions.Get(uuid, name);
                switch (e.Event)
                {
                    case LibvirtLifecycleEvent.Started or LibvirtLifecycleEvent.Resumed:
                        _sockets?.Ensure(uuid, name);
                        RefreshDomainXml(uuid);
                        // Running here again: the image the last trip left behind is in use, never capture its identity now.
                        _departures.GuestRunning(uuid);
                        _trips.NoDeparture(uuid);
                        if (e.Is(LibvirtResumedDetail.Migrated))
                        {
                            // The destination runs the guest, or a source whose migration failed runs it again: here either way.
                            _transfers?.GuestRuns(uuid);
                            session.Arrived();
                            _arrivalStreamsSince.TryRemove(uuid, out _);
                            QueueTripRecord(session, () => _trips.Arrived(uuid, _transfers?.LastIncomingPeer(uuid)));
                            _checkpoints?.OnArrived(uuid, name, _transfers?.LastIncomingPeer(uuid));
                        }
                        else if (e.Is(LibvirtResumedDetail.PostCopy))
                        {
                            // Post-copy: the destination runs the guest from now on (the source cannot resume
                            // it), and libvirt sends no Resumed/Migrated later, so this is the arrival.
                            _transfers?.GuestRuns(uuid);
                            session.Arrived();
                        }
                        else if (!e.Is(LibvirtStartedDetail.Migrated))
                        {
                            session.RunsHere();
                        }
                        if (e.Event == LibvirtLifecycleEvent.Started && !e.Is(LibvirtStartedDetail.Migrated))
                            QueueInvalidateIfAway(session);
                        if (e.Is(LibvirtStartedDetail.Migrated))
                            _trips.IncomingStarted(uuid);
                        break;
                    case LibvirtLifecycleEvent.Suspended when e.Is(LibvirtSuspendedDetail.PostCopy):
                        // The source switched to post-copy: the guest runs at the destination from
                        // now on; a stream that fails later does not bring it back here.
                        session.PostCopyStarted();
                        _departures.PostCopyStarted(uuid);
                        break;
                    case LibvirtLifecycleEvent.Stopped:
                        _sockets?.Remove(uuid);
                        _trips.GuestStopped(uuid);
                        if (e.Is(LibvirtStoppedDetail.Migrated))
                        {
                            session.Departed();
                            _departures.SourceStopped(uuid, name);
                        }
                        else
                        {
                            session.StoppedHere();
                            _trips.NoDeparture(uuid);
                            QueueSealAfterFailedArrival(session);
                        }
                        break;
                    case LibvirtLifecycleEvent.Undefined:
                        // The listing asks libvirt whether a guest recorded "here" still exists; this only tells the journal.
                        DaemonLog.GuestUndefined(_logger, name, domainEvent.DomainUuid);
                        break;
                }
                break;
            case LibvirtJobCompletedDomainEvent j:
                DaemonLog.JobCompleted(_logger, name, j.Statistics.Fields.Count);
                break;
        }
    }

    // ---- departures: what BFMig carried decides what it may touch (ImageCustody) ----

    /// <summary>
    /// Both halves of a departure are in (DepartureJoin): record the trip, then clean and seal only
    /// the images BFMig carried. Removing stale bitmaps rewrites a left image's header (and its
    /// mtime): the identity the next trip's receiver checks must be captured after that.
    /// </summary>
    private void OnDeparted(Departure departure)
    {
        var (uuid, name) = (departure.Uuid, departure.Name);
        var disks = _domainXml.Get(uuid, query: null) is { } xml ? DomainDisks.Describe(xml) : [];
        var verdicts = ImageCustody.Decide(disks, departure.Trip, departure.PostCopy);
        var session = _sessions.Get(uuid, name);
        var carried = _trips.TakeCarried(uuid);
        QueueTripRecord(session, () => _trips.Departed(departure, verdicts, _transfers?.LastOutgoingPeer(uuid), carried));
        var untouched = verdicts.Where(v => !v.Carried).ToList();
        bool tell;
        lock (_sharedDisksTold)
            tell = untouched.Count > 0 && _sharedDisksTold.Add(uuid);
        if (tell)
            DaemonLog.DisksNotTouched(_logger, name, uuid.ToString("D"), string.Join("; ", untouched.Select(v => v.Why)));
        var maps = ImageCustody.SealableMaps(verdicts, departure.Trip, departure.PostCopy);
        var cleaned = _checkpoints?.OnDeparted(uuid, name, ImageCustody.CarriedImages(verdicts)) ?? Task.CompletedTask;
        if (maps.Count > 0)
        {
            _ = cleaned.ContinueWith(_ => session.Enqueue(() => Seal(uuid, name, maps, "the source QEMU stopped")), CancellationToken.None,
                TaskContinuationOptions.None, TaskScheduler.Default);
        }
    }

    private void QueueTripRecord(GuestSession session, Func<TripRecord?> record) => session.Enqueue(() =>
    {
        if (record() is { } r)
            DaemonLog.TripRecorded(_logger, session.Name, session.Uuid.ToString("D"), r.Direction, r.Summary, r.Peer.Length > 0 ? r.Peer : "?", r.Reason);
    });

    // ---- disk image identity (after a departure, only for carried disks) ----

    // On the guest's session queue, which holds only short file writes: every second before the
    // capture is a second in which a write to the image goes unseen.
    private void Seal(Guid uuid, string name, IReadOnlyList<string> maps, string moment)
    {
        foreach (var map in maps)
        {
            string result;
            try
            {
                result = DiskBlockMap.SealIdentity(map).ToString();
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException or DiskMapException)
            {
                result = "failed: " + e.Message;
            }
            DaemonLog.DiskIdentityCaptured(_logger, name, uuid.ToString("D"), map, moment, result);
        }
    }

    /// <summary>
    /// The guest was started here other than by an incoming migration while recorded as away: its
    /// retained image is being written by a forked copy, so no map of it may be trusted again.
    /// (The identity check would see most such writes; this does not depend on timestamps.)
    /// </summary>
    private void QueueInvalidateIfAway(GuestSession session) => session.Enqueue(() =>
    {
        var (uuid, name) = (session.Uuid, session.Name);
        if (_store.ReadLocation(uuid).Record?.Place != GuestPlace.Away)
            return;
        var dir = Path.Combine(_store.GuestDirectory(uuid), "disk");
        if (!Directory.Exists(dir))
            return;
        foreach (var map in Directory.EnumerateFiles(dir, "*.map"))
        {
            try
            {
                DiskBlockMap.MarkInFlux(map);
                DaemonLog.DiskMapInvalidated(_logger, name, uuid.ToString("D"), map);
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException)
            {
                // A full store cannot take the marker; the map goes instead (the journal's rule).
                string outcome;
                try
                {
                    outcome = DiskDoubtJournal.RemoveMap(map, e);
                }
                catch (IOException removal)
                {
                    outcome = removal.Message;
                }
                DaemonLog.LocationFailed(_logger, name, uuid.ToString("D"), "disk map invalidated", outcome);
            }
        }
    });

    /// <summary>
    /// The guest stopped here while recorded away: an incoming trip failed and its QEMU is gone.
    /// Its receiver marked the identity of each image it wrote as pending and journaled the
    /// blocks it wrote; capturing the identity now lets the retry use the rest of the map
    /// (<see cref="DiskBlockMap.SealIdentity"/> leaves every other map alone).
    /// </summary>
    private void QueueSealAfterFailedArrival(GuestSession session)
    {
        // Only maps that this arrival's receivers wrote (after its first stream started): an older
        // map with a pending identity describes the image as it was then, not as it is now.
        if (!_arrivalStreamsSince.TryRemove(session.Uuid, out var since))
            return;
        session.Enqueue(() =>
        {
            if (_store.ReadLocation(session.Uuid).Record?.Place != GuestPlace.Away)
                return;
            var dir = Path.Combine(_store.GuestDirectory(session.Uuid), "disk");
            if (!Directory.Exists(dir))
                return;
            // File times come from the kernel's coarse clock (up to a tick behind): allow for it.
            var after = since.UtcDateTime - TimeSpan.FromMilliseconds(100);
            var written = Directory.EnumerateFiles(dir, "*.map").Where(m => File.GetLastWriteTimeUtc(m) >= after).ToList();
            if (written.Count > 0)
                Seal(session.Uuid, session.Name, written, "the failed arrival's QEMU stopped");
        });
    }

    /// <summary>Completes when every state change queued so far (locations, trip records, seals) is written.</summary>
    public Task FlushStateAsync() => _sessions.IdleAsync();
}
