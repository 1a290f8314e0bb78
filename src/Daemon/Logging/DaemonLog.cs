using Microsoft.Extensions.Logging;

namespace BFMig.Daemon.Logging;

/// <summary>
/// Every message bfmigd logs, with stable event ids (grouped by tens per area) so that journal
/// searches and alerts keep working across versions.
/// </summary>
internal static partial class DaemonLog
{
    // 1-9: daemon lifecycle
    [LoggerMessage(1, LogLevel.Information, "bfmigd {Version} starting as host {HostName} (state {StateDirectory}, runtime {RuntimeDirectory})")]
    public static partial void Starting(ILogger logger, string version, string hostName, string stateDirectory, string runtimeDirectory);

    [LoggerMessage(2, LogLevel.Information, "ready: {Status}")]
    public static partial void Ready(ILogger logger, string status);

    [LoggerMessage(3, LogLevel.Information, "stopping: {Reason}")]
    public static partial void Stopping(ILogger logger, string reason);

    [LoggerMessage(4, LogLevel.Information, "stopped")]
    public static partial void Stopped(ILogger logger);

    [LoggerMessage(5, LogLevel.Error, "cannot start: {Reason}")]
    public static partial void StartFailed(ILogger logger, string reason, Exception? exception);


    [LoggerMessage(6, LogLevel.Error, "the data path is off: {Reason}")]
    public static partial void DataPathOff(ILogger logger, string reason);

    [LoggerMessage(7, LogLevel.Warning, "SIGHUP: settings are read at start only; restart bfmigd to apply a changed bfmig.conf (running transfers are not affected)")]
    public static partial void ReloadIgnored(ILogger logger);

    [LoggerMessage(8, LogLevel.Error, "{Component} failed: {Reason}; stopping (systemd restarts bfmigd; until then migrations go at stock cost)")]
    public static partial void ComponentFailed(ILogger logger, string component, string reason, Exception? exception);

    [LoggerMessage(9, LogLevel.Error, "accepting on the {What} failed: {Reason}; retrying in {Milliseconds} ms ({Suppressed} more failures since the last report)")]
    public static partial void AcceptFailed(ILogger logger, string what, string reason, int milliseconds, long suppressed);

    // 10-19: D-Bus
    [LoggerMessage(10, LogLevel.Information, "owning {BusName} on {Bus}")]
    public static partial void BusNameOwned(ILogger logger, string busName, string bus);

    [LoggerMessage(11, LogLevel.Error, "D-Bus connection lost: {Reason}; stopping (systemd restarts the daemon)")]
    public static partial void BusLost(ILogger logger, string reason);

    [LoggerMessage(12, LogLevel.Warning, "refused {Method} to uid {Uid}: {Rule}")]
    public static partial void CallerRefused(ILogger logger, string method, uint uid, string rule);

    [LoggerMessage(14, LogLevel.Warning, "{Count} more refused D-Bus calls were not logged (at most {Burst} lines per {WindowSeconds} s)")]
    public static partial void CallerRefusalsSuppressed(ILogger logger, long count, int burst, int windowSeconds);

    [LoggerMessage(13, LogLevel.Warning, "{Method} failed: {Reason}")]
    public static partial void MethodFailed(ILogger logger, string method, string reason);

    // 20-29: libvirt
    [LoggerMessage(20, LogLevel.Information, "connected to libvirt at {Uri}; {Running} guests running")]
    public static partial void LibvirtConnected(ILogger logger, string uri, int running);

    [LoggerMessage(21, LogLevel.Warning, "libvirt connection to {Uri} lost ({Reason}); reconnecting")]
    public static partial void LibvirtLost(ILogger logger, string uri, string reason);

    [LoggerMessage(22, LogLevel.Warning, "cannot connect to libvirt at {Uri}: {Reason}; retrying in {DelaySeconds} s")]
    public static partial void LibvirtConnectFailed(ILogger logger, string uri, string reason, double delaySeconds);

    [LoggerMessage(23, LogLevel.Debug, "guest {Guest} ({Uuid}): {Event} detail {Detail}")]
    public static partial void LifecycleEvent(ILogger logger, string guest, string uuid, string @event, int detail);

    [LoggerMessage(24, LogLevel.Information, "guest {Guest}: job completed ({Fields} statistics)")]
    public static partial void JobCompleted(ILogger logger, string guest, int fields);

    [LoggerMessage(25, LogLevel.Error, "handling {What} failed: {Reason}; following libvirt goes on")]
    public static partial void GuestEventFailed(ILogger logger, string what, string reason, Exception exception);

    // 30-39: explicit-mode sockets
    [LoggerMessage(30, LogLevel.Information, "guest {Guest}: listening on {Count} migration sockets under {Directory}")]
    public static partial void SocketsCreated(ILogger logger, string guest, int count, string directory);

    [LoggerMessage(31, LogLevel.Information, "guest {Guest}: migration sockets removed")]
    public static partial void SocketsRemoved(ILogger logger, string guest);

    [LoggerMessage(32, LogLevel.Error, "guest {Guest}: cannot set up migration socket {Path}: {Reason}")]
    public static partial void SocketFailed(ILogger logger, string guest, string path, string reason);

    [LoggerMessage(33, LogLevel.Warning, "guest {Guest}: connection to {Path} refused: {Reason} ({Suppressed} more refused since the last report)")]
    public static partial void SocketConnectionRefused(ILogger logger, string guest, string path, string reason, long suppressed);

    [LoggerMessage(34, LogLevel.Warning, "guest {Guest}: its sockets were set up for guest {Earlier}, libvirt now names {Current} so: the stream and the sockets are {Current}'s (an event from libvirt was missed)")]
    public static partial void SocketGuestReplaced(ILogger logger, string guest, string earlier, string current);

    [LoggerMessage(35, LogLevel.Warning, "sockets were out of step with libvirt's running guests for {Seconds} s (an event from libvirt missed, or a guest still starting): running without sockets: {Missing}; sockets without a running guest: {Stale}; corrected")]
    public static partial void GuestsOutOfStep(ILogger logger, int seconds, string missing, string stale);

    [LoggerMessage(36, LogLevel.Error, "accepting on the {What} failed: {Reason}; no longer accepting there (waiting cannot clear this error)")]
    public static partial void AcceptEnded(ILogger logger, string what, string reason);

    // 40-49: transfers
    [LoggerMessage(40, LogLevel.Information, "transfer {Id}: {Direction} {Kind} of guest {Guest} with peer {Peer} started (pid {Pid})")]
    public static partial void TransferStarted(ILogger logger, int id, string direction, string kind, string guest, string peer, int pid);

    [LoggerMessage(45, LogLevel.Warning, "transfer {Id}: {Kind} of guest {Guest} ran without a store: {Reason}")]
    public static partial void TransferWithoutStore(ILogger logger, int id, string kind, string guest, string reason);

    [LoggerMessage(41, LogLevel.Information, "transfer {Id}: {Direction} {Kind} of guest {Guest} finished: exit {ExitCode}, {WireBytes} bytes on the wire for {StreamBytes} stream bytes in {Seconds:F1} s")]
    public static partial void TransferSucceeded(ILogger logger, int id, string direction, string kind, string guest, int exitCode, long wireBytes, long streamBytes, double seconds);

    [LoggerMessage(42, LogLevel.Warning, "transfer {Id}: {Direction} {Kind} of guest {Guest} failed: exit {ExitCode}: {Error}")]
    public static partial void TransferFailed(ILogger logger, int id, string direction, string kind, string guest, int exitCode, string error);

    [LoggerMessage(43, LogLevel.Warning, "refused a {Kind} stream of guest {Guest}: {Reason}")]
    public static partial void TransferRefused(ILogger logger, string kind, string guest, string reason);

    [LoggerMessage(44, LogLevel.Warning, "killing {Count} transfers still running after {GraceSeconds} s")]
    public static partial void KillingTransfers(ILogger logger, int count, int graceSeconds);

    // 50-59: peer connections
    [LoggerMessage(50, LogLevel.Information, "accepting peer connections on {Endpoint}")]
    public static partial void PeerListening(ILogger logger, string endpoint);

    [LoggerMessage(51, LogLevel.Warning, "rejected peer connection from {Remote}: {Reason}")]
    public static partial void PeerRejected(ILogger logger, string remote, string reason);

    [LoggerMessage(52, LogLevel.Warning, "{Count} more peer connections were rejected without a line each (at most {Burst} lines per {WindowSeconds} s)")]
    public static partial void PeerRejectionsSuppressed(ILogger logger, long count, int burst, int windowSeconds);

    [LoggerMessage(53, LogLevel.Warning, "receiving helper of transfer {Id} (guest {Guest}) killed: its peer did not authenticate within {Seconds} s")]
    public static partial void HandshakeExpired(ILogger logger, int id, string guest, int seconds);

    [LoggerMessage(55, LogLevel.Warning, "peer {Peer} proved itself from {Remote}, an address not in its configuration: its streams share the half of the handshake places left to addresses of no configured peer; add the address to [peers:{Peer}] migration_addresses")]
    public static partial void PeerFromUnlistedAddress(ILogger logger, string peer, string remote);

    // Debug: a peer can cause it at will (bounded by the waiters' limit, but not worth a line each).
    [LoggerMessage(54, LogLevel.Debug, "{Kind} stream of guest {Guest} waits for a handshake slot ({Slots} incoming streams are authenticating)")]
    public static partial void HandshakeQueued(ILogger logger, string kind, string guest, int slots);

    // 60-69: state
    [LoggerMessage(60, LogLevel.Information, "guest {Guest} ({Uuid}) is now {Location}{PeerText}")]
    public static partial void LocationRecorded(ILogger logger, string guest, string uuid, string location, string peerText);

    [LoggerMessage(61, LogLevel.Error, "guest {Guest} ({Uuid}): cannot record location {Location}: {Reason}")]
    public static partial void LocationFailed(ILogger logger, string guest, string uuid, string location, string reason);

    [LoggerMessage(68, LogLevel.Information, "guest {Guest} ({Uuid}): {Trip} {Peer} pending until libvirt confirms it")]
    public static partial void TripPending(ILogger logger, string guest, string uuid, string trip, string peer);

    [LoggerMessage(69, LogLevel.Warning, "guest {Guest} ({Uuid}): {Trip} {Peer} did not happen ({Why}); it stays {Location}")]
    public static partial void TripRolledBack(ILogger logger, string guest, string uuid, string trip, string peer, string why, string location);

    [LoggerMessage(62, LogLevel.Warning, "forgot everything retained for guest {Guest} ({Uuid})")]
    public static partial void Forgotten(ILogger logger, string guest, string uuid);

    // 70-79: hook and split-brain guard
    [LoggerMessage(70, LogLevel.Debug, "hook: {Guest} {Operation} {SubOperation} {Extra}")]
    public static partial void HookEvent(ILogger logger, string guest, string operation, string subOperation, string extra);

    [LoggerMessage(71, LogLevel.Warning, "split-brain guard refused {Operation} of guest {Guest}: {Message}")]
    public static partial void SplitBrainRefused(ILogger logger, string operation, string guest, string message);

    [LoggerMessage(72, LogLevel.Information, "guest {Guest}: incoming migration announced by the hook")]
    public static partial void IncomingMigration(ILogger logger, string guest);

    [LoggerMessage(63, LogLevel.Information, "guest {Guest} ({Uuid}): identity of the image behind disk map {Map} captured after {Moment}: {Result}")]
    public static partial void DiskIdentityCaptured(ILogger logger, string guest, string uuid, string map, string moment, string result);

    [LoggerMessage(64, LogLevel.Warning, "guest {Guest} ({Uuid}) started here while recorded away: disk map {Map} invalidated, the next trip here sends the whole disk")]
    public static partial void DiskMapInvalidated(ILogger logger, string guest, string uuid, string map);

    [LoggerMessage(65, LogLevel.Information, "guest {Guest} ({Uuid}): {Direction} {Path}, peer {Peer}: {Reason}")]
    public static partial void TripRecorded(ILogger logger, string guest, string uuid, string direction, string path, string peer, string reason);

    [LoggerMessage(66, LogLevel.Information, "guest {Guest} ({Uuid}): disks BFMig did not carry are never opened, sealed or retained: {Disks}")]
    public static partial void DisksNotTouched(ILogger logger, string guest, string uuid, string disks);

    [LoggerMessage(67, LogLevel.Information, "guest {Guest} ({Uuid}) was undefined here")]
    public static partial void GuestUndefined(ILogger logger, string guest, string uuid);

    // 90-99: location record (60-69 are full)
    [LoggerMessage(90, LogLevel.Error, "guest {Guest} ({Uuid}): not recording {Change}: its location record {Problem}; it is left as it is (never overwritten unread), and `bfmig forget` clears it")]
    public static partial void LocationUnreadable(ILogger logger, string guest, string uuid, string change, string problem);

    // One per prepare or start of such a guest: those come from an operator or libvirt, never from a peer or a guest.
    [LoggerMessage(91, LogLevel.Warning, "split-brain guard: {Warning}")]
    public static partial void SplitBrainRecordUnusable(ILogger logger, string warning);

    [LoggerMessage(94, LogLevel.Warning, "guest {Guest} ({Uuid}): a stream of its post-copy departure ended badly ({Why}); the guest already runs at the destination, so the departure stays pending until libvirt says how the migration ended")]
    public static partial void PostCopyStreamEnded(ILogger logger, string guest, string uuid, string why);

    // 80-89: checkpoints and bitmaps
    [LoggerMessage(80, LogLevel.Information, "guest {Guest}: sent {Count} checkpoint(s) to {Peer}")]
    public static partial void CheckpointsSent(ILogger logger, string guest, int count, string peer);

    [LoggerMessage(81, LogLevel.Warning, "guest {Guest}: cannot send its checkpoints to {Peer}: {Reason} (they will be missing there)")]
    public static partial void CheckpointsNotSent(ILogger logger, string guest, string peer, string reason);

    [LoggerMessage(82, LogLevel.Information, "guest {Uuid}: received {Count} checkpoint(s) from {Peer}, redefined on arrival")]
    public static partial void CheckpointsReceived(ILogger logger, string uuid, int count, string peer);

    [LoggerMessage(83, LogLevel.Warning, "refused checkpoints from {Remote}: {Reason}")]
    public static partial void CheckpointsRefused(ILogger logger, string remote, string reason);

    [LoggerMessage(84, LogLevel.Information, "guest {Guest}: redefined {Redefined} of {Count} checkpoint(s); {Bitmaps}")]
    public static partial void CheckpointsRedefined(ILogger logger, string guest, int redefined, int count, string bitmaps);

    [LoggerMessage(85, LogLevel.Warning, "guest {Guest}: checkpoint {Checkpoint} not redefined: {Reason}")]
    public static partial void CheckpointNotRedefined(ILogger logger, string guest, string checkpoint, string reason);

    [LoggerMessage(86, LogLevel.Warning, "guest {Guest}: checkpoints not redefined: {Reason}")]
    public static partial void CheckpointsNotRedefined(ILogger logger, string guest, string reason);

    [LoggerMessage(87, LogLevel.Information, "guest {Guest}: arrived without checkpoint metadata from the source")]
    public static partial void CheckpointsMissing(ILogger logger, string guest);

    [LoggerMessage(88, LogLevel.Information, "guest {Guest}: image left behind {Image}: stale bitmaps removed: {Removed}")]
    public static partial void DepartureCleaned(ILogger logger, string guest, string image, string removed);

    [LoggerMessage(89, LogLevel.Warning, "guest {Guest}: cannot clean the bitmaps of the image left behind {Image}: {Reason} (a return trip into it may fail)")]
    public static partial void DepartureNotCleaned(ILogger logger, string guest, string image, string reason);

    // 100-109: transparent mode
    [LoggerMessage(100, LogLevel.Information, "transparent mode on: QEMU user {Uid}'s connections to {Peers} ports {Ports} redirected to 127.0.0.1:{Port} (table inet bfmig, removed by the kernel when bfmigd exits)")]
    public static partial void TransparentOn(ILogger logger, uint uid, string peers, string ports, int port);

    [LoggerMessage(101, LogLevel.Warning, "transparent mode off: {Reason}; ordinary migrations go straight to the peer at stock cost (explicit mode still works)")]
    public static partial void TransparentOff(ILogger logger, string reason);

    [LoggerMessage(102, LogLevel.Information, "transparent: guest {Guest}: {Stream} stream to {Peer} ({Destination}) intercepted, first bytes after {Milliseconds} ms")]
    public static partial void TransparentIntercepted(ILogger logger, string guest, string stream, string peer, string destination, long milliseconds);

    [LoggerMessage(103, LogLevel.Information, "transparent: guest {Guest}: {Stream} stream to {Peer} port {Port} accelerated through bfmig-transfer")]
    public static partial void TransparentAccelerated(ILogger logger, string guest, string stream, string peer, int port);

    [LoggerMessage(104, LogLevel.Information, "transparent: guest {Guest}: {Stream} stream to {Peer} ({Destination}) not accelerated: {Reason}")]
    public static partial void TransparentNotAccelerated(ILogger logger, string guest, string stream, string peer, string destination, string reason);

    [LoggerMessage(105, LogLevel.Information, "transparent: guest {Guest}: {Stream} stream to {Destination} carried directly, {Bytes} bytes: {Result}")]
    public static partial void TransparentCarried(ILogger logger, string guest, string stream, string destination, long bytes, string result);

    [LoggerMessage(106, LogLevel.Warning, "transparent: connection from {Remote} dropped: {Reason}")]
    public static partial void TransparentDropped(ILogger logger, string remote, string reason);

    [LoggerMessage(109, LogLevel.Warning, "transparent: {What} not redirected: {Reason}; its migrations go straight to the peer at stock cost")]
    public static partial void TransparentPeerSkipped(ILogger logger, string what, string reason);

    [LoggerMessage(108, LogLevel.Warning, "transparent: {Count} more dropped connections were not logged (at most 10 lines per 10 s)")]
    public static partial void TransparentDropsSuppressed(ILogger logger, long count);

    [LoggerMessage(107, LogLevel.Warning, "refused a transparent {Kind} stream of guest {Guest} from {Peer} to port {Port}: {Reason}")]
    public static partial void TransparentTargetRefused(ILogger logger, string kind, string guest, string peer, int port, string reason);

    // 110-119: retention
    [LoggerMessage(110, LogLevel.Information, "retention: {Limits}; checked every {Minutes} min and after every trip")]
    public static partial void RetentionLimits(ILogger logger, string limits, double minutes);

    [LoggerMessage(111, LogLevel.Warning, "retention: evicted the departure snapshot of guest {Guest} ({Uuid}), {Bytes} bytes: {Reason}; its next trip sends everything")]
    public static partial void Evicted(ILogger logger, string guest, string uuid, long bytes, string reason);

    [LoggerMessage(112, LogLevel.Information, "retention: not evicting guest {Guest} ({Uuid}) now: {Why}; tried again at the next check")]
    public static partial void EvictionDeferred(ILogger logger, string guest, string uuid, string why);

    [LoggerMessage(113, LogLevel.Error, "retention: the check failed: {Reason}")]
    public static partial void RetentionFailed(ILogger logger, string reason);

    [LoggerMessage(114, LogLevel.Debug, "peer port: answered {Remote}'s version probe (protocol {Version})")]
    public static partial void PeerProbeAnswered(ILogger logger, string remote, int version);
}
