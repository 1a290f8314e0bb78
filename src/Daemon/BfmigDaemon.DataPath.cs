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

/// <summary>bfmigd's data path: QEMU and peer connections handed to helpers, and what their reports mean.</summary>
public sealed partial class BfmigDaemon
{
    // ---- data path ----

    private void OnQemuConnected(string guest, Guid uuid, PeerOptions peer, StreamKind kind, Socket connection)
    {
        if (_dataPathOff is { } why)
        {
            DaemonLog.TransferRefused(_logger, TransferManager.KindArg(kind), guest, why);
            connection.Dispose();
            return;
        }
        // A socket belongs to a name; which guest has that name now is libvirt's to say. Sockets
        // set up for an earlier guest of the name (its Stopped event missed) must not send this
        // one's memory under the earlier one's identity, which its peer refuses. One lookup per
        // stream, and only on a live connection: libvirtd is the one connecting here.
        if (_libvirt is { IsConnected: true } libvirt && libvirt.Lookup(guest) is { Running: true } current
            && current.Name == guest && current.Uuid != uuid)
        {
            DaemonLog.SocketGuestReplaced(_logger, guest, uuid.ToString("D"), current.Uuid.ToString("D"));
            _sockets?.Adopt(guest, current.Uuid);
            uuid = current.Uuid;
        }
        _checkpoints?.OnTripStarting(uuid, guest, peer);
        StreamStarting(uuid, guest, peer.Name, TransferDirection.Send, kind, TripRoute.Explicit);
        _transfers!.StartSend(guest, uuid, peer, kind, connection, DisksOf(uuid, kind));
    }

    IReadOnlyCollection<(Guid Uuid, string Name)> ITransparentHost.RunningGuests() => _sockets?.Guests ?? [];

    OutgoingMemory? ITransparentHost.MemoryGoingTo(string peer, ushort targetPort) => _transfers?.MemoryGoingTo(peer, targetPort);

    IDisposable ITransparentHost.Carried(Guid uuid, string stream, string why) => _trips.StreamCarried(uuid, stream, why);

    bool ITransparentHost.StartSend(string guest, Guid uuid, PeerOptions peer, StreamKind kind, Socket qemu, ushort targetPort)
    {
        // The slot first: nothing is recorded for a stream that is then carried at stock cost.
        if (_transfers is not { } transfers || !transfers.TryReserveSend())
            return false;
        IReadOnlyList<DomainDisk> disks;
        try
        {
            disks = DisksOf(uuid, kind);
            StreamStarting(uuid, guest, peer.Name, TransferDirection.Send, kind, TripRoute.Transparent);
            _checkpoints?.OnTripStarting(uuid, guest, peer);
        }
        catch
        {
            // Not started: the slot goes back, or it would be lost until bfmigd restarts.
            transfers.ReleaseSend();
            throw;
        }
        transfers.StartSend(guest, uuid, peer, kind, qemu, disks, targetPort, reserved: true);
        return true;
    }

    /// <summary>
    /// A stream of the guest's trip reached BFMig: the trip record and the departure join must know
    /// before the trip ends. Explicit mode calls it for each connection on a socket; transparent
    /// mode calls it with <see cref="TripRoute.Transparent"/> for each redirected connection.
    /// </summary>
    internal void StreamStarting(Guid uuid, string guest, string peer, TransferDirection direction, StreamKind kind, TripRoute route)
    {
        _sessions.Get(uuid, guest).TripStarting(direction, peer);
        _trips.StreamStarted(uuid, direction, kind, route);
        if (direction == TransferDirection.Send)
            _departures.StreamStarted(uuid);
        else
            _arrivalStreamsSince.TryAdd(uuid, _time.GetUtcNow());
    }

    /// <summary>
    /// The file-backed disks of the guest as libvirt has them now: on the source the images the
    /// mirror reads, on the destination (the incoming domain) the ones it writes into.
    /// </summary>
    private IReadOnlyList<DomainDisk> DisksOf(Guid uuid, StreamKind kind) =>
        kind == StreamKind.Nbd && _domainXml.Get(uuid, _libvirt is { } l ? l.GetXml : null) is { } xml ? DomainDisks.Parse(xml) : [];

    /// <summary>The incoming domain's memory (0 when its XML is unknown): the most RAM its sender may declare.</summary>
    private long MemoryOf(Guid uuid) =>
        _domainXml.Get(uuid, _libvirt is { } l ? l.GetXml : null) is { } xml ? DomainMemory.MaxBytes(xml) : 0;

    /// <summary>Reads the guest's live XML into the cache in the background (never on a stream's path).</summary>
    private void RefreshDomainXml(Guid uuid)
    {
        if (_libvirt is { } libvirt)
            _domainXml.RefreshInBackground(uuid, libvirt.GetXml);
    }

    /// <summary>
    /// The hook's own record of an incoming migration, left when it could not reach this daemon
    /// in time (restarting, or a loaded host past the hook's deadline): a root-written file in
    /// <c>RUNTIME/incoming/UUID</c> (root-owned directories, so neither a guest nor the QEMU user
    /// writes there), valid for <see cref="SplitBrainGuard.StreamWindow"/>. Without it such a migration would fail here.
    /// </summary>
    private bool HookMarkedIncoming(Guid uuid) =>
        new IncomingMarkers(_options.RuntimeDirectory, uuid).Read() is { } marker && _time.GetUtcNow() - marker.At <= SplitBrainGuard.StreamWindow;

    private PeerRoute RoutePeer(RouteRequest hello)
    {
        if (!_options.Peers.Any(p => p.Name == hello.SenderName))
            return new PeerRoute(null, $"sender '{hello.SenderName}' is not a configured peer ([peers:NAME] in bfmig.conf)");
        // Checked before anything costs more than a lookup: only a migration this host's own hook announced
        // (or one whose authenticated streams already run) gets a helper, a store or a checkpoint exchange.
        var arrivingFrom = _transfers?.ReceivingFrom(hello.Guest);
        if (!_guard.ExpectsStreams(hello.Guest) && arrivingFrom is null && !HookMarkedIncoming(hello.Guest))
            return new PeerRoute(null, $"no incoming migration of guest {hello.Guest:D} is expected here (this host's hook has not announced one)");
        // A trip comes from one host: once a stream of it proved its peer, another peer's is not part of it.
        if (arrivingFrom is not null && arrivingFrom != hello.SenderName)
            return new PeerRoute(null, $"guest {hello.Guest:D} is arriving from {arrivingFrom}, not from {hello.SenderName}");
        var name = _libvirt?.LookupName(hello.Guest);
        if (name is null)
            return new PeerRoute(null, $"no guest {hello.Guest:D} here (the migration's prepare step has not run, or libvirt is unreachable)");
        return new PeerRoute(name, "");
    }

    // stranger: the connection comes from an address of no configured peer (PeerListener.StrangersShare).
    private async Task AcceptPeerAsync(RouteRequest hello, string guest, Socket connection, bool stranger)
    {
        if (hello.Kind == StreamKind.Control)
        {
            if (_checkpoints is { } keeper)
                _ = keeper.ServeAsync(connection, hello, stranger);
            else
                connection.Dispose();
            return;
        }
        string local;
        if (hello.TargetPort == 0)
        {
            local = "unix:" + Path.Combine(_options.RuntimeDirectory, _options.HostName, guest + (hello.Kind == StreamKind.Mig ? ".mig" : ".nbd"));
        }
        else if (new QemuProcesses(_options.QemuPidDirectory).GuestListener(guest, hello.TargetPort) is { } listener)
        {
            local = ProcNet.ConnectArgument(ProcNet.ConnectableAddress(listener));
        }
        else
        {
            // Never take the peer's word for a local port: only the incoming guest's own QEMU listener.
            // Before the peer proved anything, so under the peer refusals' one rate limit.
            PeerListener.LogRejection(_logger, _peerRejections, () => DaemonLog.TransparentTargetRefused(_logger, TransferManager.KindArg(hello.Kind), guest,
                hello.SenderName, hello.TargetPort, "the guest's QEMU does not listen on that port"));
            connection.Dispose();
            return;
        }
        // The arrival is recorded (where the guest comes from, which streams) only once the peer
        // proved its name: an unauthenticated connection may claim any configured peer's.
        var route = hello.TargetPort == 0 ? TripRoute.Explicit : TripRoute.Transparent;
        await _transfers!.StartReceiveAsync(guest, hello.Guest, hello.SenderName, hello.Kind, local, connection, DisksOf(hello.Guest, hello.Kind),
            hello.Kind == StreamKind.Mig ? MemoryOf(hello.Guest) : 0, hello.FromRouteFrame,
            authenticated: () => StreamStarting(hello.Guest, guest, hello.SenderName, TransferDirection.Receive, hello.Kind, route), stranger: stranger).ConfigureAwait(false);
    }

    // The helper reports about twice a second and once at its end: the signal follows each report.
    private void OnProgress(StreamProgress p)
    {
        var sent = (ulong)Math.Max(0, p.Progress.WireBytes);
        var saved = (ulong)Math.Max(0, p.Progress.LocalBytes - p.Progress.WireBytes);
        _bus?.TransferProgress(p.Guest, p.Peer, p.Stream, sent, saved);
    }

    private void OnTripFinished(IReadOnlyList<TransferOutcome> outcomes)
    {
        var first = outcomes[0];
        var ok = outcomes.All(o => o.Ok);
        _sessions.Get(first.Uuid, first.Guest).TripEnded(first.Direction, ok, string.Join("; ", outcomes.Where(o => !o.Ok).Select(o => $"{o.Stream}: {o.Error}")));
        if (first.Direction == TransferDirection.Send)
            _departures.TripEnded(first.Uuid, first.Guest, outcomes);
        var message = string.Join("; ", outcomes.Select(o => o.Ok
            ? $"{o.Stream}: {o.Stats?.StreamBytes ?? 0} bytes carried, {(o.Stats?.WireBytesOut ?? 0) + (o.Stats?.WireBytesIn ?? 0)} on the wire"
            : $"{o.Stream}: failed (exit {o.ExitCode}): {o.Error}"));
        _bus?.TransferFinished(first.Guest, first.Peer, ok, message);
        // The trip's stores are committed: what the host retains may have grown past its limits.
        _retention?.Request();
    }
}
