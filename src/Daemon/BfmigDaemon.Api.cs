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
using BFMig.Transfer.Store;
using BFMig.Transfer.Wire;
using Microsoft.Extensions.Logging;

namespace BFMig.Daemon;

/// <summary>bfmigd's D-Bus methods (<see cref="IManagerService"/>).</summary>
public sealed partial class BfmigDaemon
{
    // ---- D-Bus methods ----

    /// <inheritdoc/>
    public HookDecision HookEvent(string guest, string operation, string subOperation, string extra, string domainXml)
    {
        DaemonLog.HookEvent(_logger, guest, operation, subOperation, extra);
        // On a destination this is the incoming domain's XML, before any stream connects.
        _domainXml.Remember(domainXml);
        var decision = _guard.Decide(guest, operation, subOperation, domainXml);
        if (!decision.Allow)
            DaemonLog.SplitBrainRefused(_logger, operation, guest, decision.Message);
        return decision;
    }

    /// <inheritdoc/>
    public IReadOnlyList<KeyValuePair<string, object>> GetStatus(out IReadOnlyList<string> peers)
    {
        peers = [.. _options.Peers.Select(p => p.Name)];
        return
        [
            new("host_name", _options.HostName),
            new("version", BuildInfo.Version),
            new("active_transfers", (uint)(_transfers?.Active ?? 0)),
            new("uptime_seconds", (ulong)_uptime.Elapsed.TotalSeconds),
            new("libvirt_uri", _options.LibvirtUri),
            new("libvirt_connected", _libvirt?.IsConnected ?? false),
            new("guests_with_sockets", (uint)(_sockets?.Guests.Count ?? 0)),
            new("data_port", (uint)PeerPort),
            new("transparent", TransparentState),
        ];
    }

    /// <inheritdoc/>
    public IReadOnlyList<GuestListing> ListGuests() =>
        [.. _store.List().Select(r => new GuestListing(r.Uuid.ToString("D"), r.Name.Length > 0 ? r.Name : _libvirt?.LookupName(r.Uuid) ?? "",
            ListedLocation(r), r.Place?.Peer ?? r.State?.Peer ?? "", r.State?.Generation ?? 0, r.MemoryBytes, r.DiskBytes,
            r.Place is null || r.Place.Since == default ? 0 : r.Place.Since.ToUnixTimeSeconds()))];

    /// <summary>
    /// "here" only while libvirt still knows the guest: one destroyed and undefined here (no
    /// migration) leaves its record saying "here", and listing it so would claim a guest that
    /// does not exist. The record itself stays (the retained state is still the peer's view).
    /// </summary>
    private string ListedLocation(GuestRecord r) =>
        r.Place?.Place == GuestPlace.Here && _libvirt?.IsDefined(r.Uuid) == false ? "undefined" : r.Location;

    /// <inheritdoc/>
    public IReadOnlyList<TripListing> ListTrips() =>
        [.. _store.List().Select(r => (r.Uuid, Trip: _trips.Read(r.Uuid))).Where(t => t.Trip is not null)
            .Select(t => new TripListing(t.Uuid.ToString("D"), t.Trip!.Direction, t.Trip.Path, t.Trip.MemoryOnly, t.Trip.Peer, t.Trip.Reason, t.Trip.AtUnixSeconds))];

    /// <inheritdoc/>
    public IReadOnlyList<StoreCostListing> ListStoreCosts(out string limits)
    {
        limits = _options.Retention.ToString();
        return [.. _store.Uuids().Select(u => (Uuid: u, Cost: _store.Cost(u), Changed: _store.LastChanged(u)))
            .Where(c => c.Changed is not null)
            .Select(c => new StoreCostListing(c.Uuid.ToString("D"), (ulong)c.Cost.MemoryStore, (ulong)c.Cost.DiskMaps, (ulong)c.Cost.Checkpoints,
                (ulong)c.Cost.Other, c.Changed!.Value.ToUnixTimeSeconds()))];
    }

    /// <inheritdoc/>
    public void Forget(string guest)
    {
        var record = FindRetained(guest);
        if (_transfers?.IsBusy(record.Uuid) == true)
            throw new DaemonApiException(DaemonErrors.Busy, $"a transfer of guest {guest} is running; wait for the migration to end, then forget it");
        // On the guest's queue: a settle queued before runs first and cannot recreate the record after the delete.
        var forgotten = _sessions.Get(record.Uuid).Submit(() =>
        {
            if (GuestSession.PendingTripText(_store.ReadLocation(record.Uuid).Record) is { } pending)
            {
                throw new DaemonApiException(DaemonErrors.Busy,
                    $"guest {guest} has {pending} that libvirt has not confirmed yet; wait for the migration to end (bfmigd settles it from libvirt's events), then forget it");
            }
            _store.Delete(record.Uuid);
        });
        try
        {
            // The queue holds only small file operations; the bus call waits for them.
            forgotten.GetAwaiter().GetResult();
        }
        catch (IOException e)
        {
            throw new DaemonApiException(DaemonErrors.Busy, $"cannot forget guest {guest}: {e.Message}");
        }
        DaemonLog.Forgotten(_logger, record.Name.Length > 0 ? record.Name : guest, record.Uuid.ToString("D"));
    }

    private GuestRecord FindRetained(string guest)
    {
        // A name is not an identity: guests that were undefined and defined again under the same
        // name leave records with other UUIDs. The guest libvirt knows by that name now comes
        // first; a UUID, or a name libvirt no longer knows, is looked up in the records.
        var record = _libvirt?.Lookup(guest) is { } known ? _store.Read(known.Uuid) : _store.Find(guest);
        return record ?? throw new DaemonApiException(DaemonErrors.UnknownGuest, $"nothing is retained for guest '{guest}' on this host");
    }

    /// <inheritdoc/>
    public async Task<TripEstimate> EstimateAsync(string guest, string peer)
    {
        if (!_options.Peers.Any(p => p.Name == peer))
            throw new DaemonApiException(DaemonErrors.UnknownPeer, $"'{peer}' is not a configured peer");
        var record = FindRetained(guest);
        if (!_estimating.TryAdd(record.Uuid, true))
            throw new DaemonApiException(DaemonErrors.Busy,
                $"an Estimate of guest {guest} is already running (one at a time per guest: QEMU samples its memory for a second or more); try again when it has answered");
        try
        {
            return await EstimateAsync(record, peer).ConfigureAwait(false);
        }
        finally
        {
            _estimating.TryRemove(record.Uuid, out _);
        }
    }

    private async Task<TripEstimate> EstimateAsync(GuestRecord record, string peer)
    {
        var dir = _store.GuestDirectory(record.Uuid);
        var memory = GuestStateStore.MemoryBlocks(dir).ToList();
        var stockMemory = (ulong)memory.Sum(b => b.Length);
        // Nothing retained: stock (and BFMig) sends the guest's whole RAM, as large as libvirt says it is.
        if (memory.Count == 0 && _checkpoints?.MemoryBytes(record.Uuid) is { } ram)
            stockMemory = ram;
        var inSync = record.State is { Generation: > 0 } s && s.Peer == peer;
        ulong memoryBytes;
        string memoryBasis;
        if (inSync && memory.Count > 0)
        {
            var unknown = memory.Sum(b => b.UnknownPages);
            memoryBytes = (ulong)unknown * 4096;
            memoryBasis = $"memory: store in sync with {peer} at generation {record.State!.Generation}, {unknown} of {stockMemory / 4096} pages unknown; " +
                "pages the guest changed since are not tracked yet, so this is a lower bound";
        }
        else
        {
            memoryBytes = stockMemory;
            memoryBasis = memory.Count == 0 ? "memory: nothing retained, all of it is sent" : $"memory: store not in sync with {peer}, all of it is sent";
        }
        var disks = GuestStateStore.DiskMaps(dir).ToList();
        var stockDisk = (ulong)disks.Sum(d => (decimal)d.ImageSize);
        var diskBytes = (ulong)disks.Sum(d => Math.Min((decimal)d.ImageSize, (decimal)d.UnknownBlocks * d.BlockSize));
        var diskBasis = disks.Count == 0
            ? "disk: no block map retained, all of it is sent"
            : $"disk: {disks.Count} block map(s), unknown blocks counted; blocks written since are not tracked";
        if (_checkpoints is { } keeper)
        {
            if (keeper.DiskSinceArrival(record.Uuid, peer, out var why) is { } delta)
            {
                diskBytes = disks.Count == 0 ? delta.Bytes : diskBytes + delta.Bytes;
                diskBasis = delta.Basis + (disks.Count == 0 ? "" : ", plus unknown blocks of the block maps");
            }
            else
            {
                diskBasis += $" ({why})";
            }
            (memoryBytes, memoryBasis) = await AddDirtyRateAsync(keeper, record.Uuid, peer, memoryBytes, stockMemory, memoryBasis, _stop.Token).ConfigureAwait(false);
        }
        return new TripEstimate(diskBytes, memoryBytes, stockDisk, stockMemory, memoryBasis + ". " + diskBasis + ".");
    }

    /// <summary>
    /// Pages changed since arrival are not tracked; QEMU's dirty rate times the time since the
    /// arrival bounds them from above (a guest that rewrites the same pages changes fewer).
    /// </summary>
    private async Task<(ulong Bytes, string Basis)> AddDirtyRateAsync(CheckpointKeeper keeper, Guid uuid, string peer, ulong bytes, ulong stock, string basis,
        CancellationToken ct)
    {
        if (keeper.ArrivalOf(uuid) is not { } arrival || arrival.Peer != peer)
            return (bytes, basis);
        var rate = await keeper.MeasureDirtyRateAsync(uuid, ct).ConfigureAwait(false);
        if (rate is not { } mibPerSecond)
            return (bytes, basis + "; QEMU's dirty rate could not be measured");
        var seconds = Math.Max(0, (_time.GetUtcNow() - arrival.At).TotalSeconds);
        var changed = (ulong)Math.Min(stock, mibPerSecond * 1048576 * seconds);
        var total = Math.Min(stock == 0 ? bytes + changed : stock, bytes + changed);
        return (total, basis.Replace("; pages the guest changed since are not tracked yet, so this is a lower bound", "", StringComparison.Ordinal)
            + string.Create(CultureInfo.InvariantCulture, $"; plus QEMU's dirty rate {mibPerSecond:0.##} MiB/s over the {seconds:0} s since the arrival from {peer} ({changed} bytes, an upper bound)"));
    }

    /// <inheritdoc/>
    public MigrationUris PrepareMigration(string guest, string peer)
    {
        var target = _options.Peers.FirstOrDefault(p => p.Name == peer)
            ?? throw new DaemonApiException(DaemonErrors.UnknownPeer, $"'{peer}' is not a configured peer ([peers:{peer}] in bfmig.conf)");
        var domain = _libvirt?.Lookup(guest)
            ?? throw new DaemonApiException(DaemonErrors.UnknownGuest, $"libvirt at {_options.LibvirtUri} has no guest '{guest}' (or is unreachable)");
        if (!domain.Running)
            throw new DaemonApiException(DaemonErrors.Failed, $"guest {domain.Name} is not running; a live migration needs a running guest");
        if (_dataPathOff is { } off)
            throw new DaemonApiException(DaemonErrors.Failed, "the data path is off: " + off);
        if (Volatile.Read(ref _stopping) != 0)
            throw new DaemonApiException(DaemonErrors.Failed, "bfmigd is stopping; the migration can go at stock cost or wait for its restart");
        if (_sockets is null || !_sockets.Ensure(domain.Uuid, domain.Name))
            throw new DaemonApiException(DaemonErrors.Failed, $"cannot set up the migration sockets of {domain.Name} (see the daemon's log)");
        return new MigrationUris(target.LibvirtUri,
            "unix://" + _sockets.SocketPath(peer, domain.Name, StreamKind.Mig),
            "unix://" + _sockets.SocketPath(peer, domain.Name, StreamKind.Nbd));
    }

    /// <inheritdoc/>
    public IReadOnlyList<DoctorCheck> Doctor() => new HostDoctor(_options, _libvirt, TransparentState).Run();

    internal static string Format(ulong value) => value.ToString(CultureInfo.InvariantCulture);
}
