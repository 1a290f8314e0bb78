using System.Globalization;
using System.IO.Pipes;
using System.Net.Sockets;
using System.Text.Json.Serialization;
using System.Text.Json;
using BFMig.Daemon.Configuration;
using BFMig.Daemon.Guests;
using BFMig.Daemon.Logging;
using BFMig.Native.Linux;
using BFMig.Native.Processes;
using BFMig.Transfer.Wire;
using BFMig.Transfer;
using Microsoft.Extensions.Logging;

namespace BFMig.Daemon.Transfers;

/// <summary>
/// Runs one <c>bfmig-transfer</c> process per migration stream, with the stream's socket in the
/// child's descriptor 3, and at most <see cref="DaemonOptions.MaxTransfers"/> at once. Reports
/// each stream (<see cref="StreamFinished"/>) and each trip, i.e. when the last stream of a guest
/// in one direction ended (<see cref="TripFinished"/>).
/// </summary>
public sealed partial class TransferManager
{
    private const int HelperFd = 3;
    private const int ProgressFd = 4;

    /// <summary>
    /// Receiving helpers whose peer has not authenticated yet, at most. They do not hold transfer
    /// slots (<c>transfer:max_concurrent</c>), so connections that never authenticate cannot keep real
    /// transfers out; this small pool and <see cref="HandshakeDeadline"/> bound what they cost.
    /// A stream that finds the pool full waits for a place (<see cref="MaxHandshakeWaiters"/>, each
    /// at most <see cref="HandshakeDeadline"/>): guests arriving together open more streams at once
    /// than the pool holds, and a refused stream would fail its migration.
    /// </summary>
    public const int HandshakeSlots = 4;

    /// <summary>
    /// Routed incoming streams waiting for a handshake slot, at most (each is one socket and no
    /// process). Strangers may hold half (<see cref="PeerListener.StrangersShare"/>): 32, as many as
    /// all streams could before, for a peer that connects from an address not in its configuration.
    /// </summary>
    public const int MaxHandshakeWaiters = 64;

    /// <summary>A receiving helper whose peer has not authenticated by then is killed.</summary>
    public static readonly TimeSpan HandshakeDeadline = TimeSpan.FromSeconds(10);
    private readonly DaemonOptions _options;
    private readonly string _helper;
    private readonly string _statsDirectory;
    private readonly ILogger _logger;
    private readonly Lock _gate = new();
    private readonly Dictionary<int, Running> _running = [];
    private readonly Dictionary<(Guid, TransferDirection), Trip> _trips = [];
    private readonly Dictionary<Guid, string> _lastOutgoingPeer = [];
    private readonly Dictionary<Guid, string> _lastIncomingPeer = [];
    private readonly HashSet<Task> _watchers = [];
    // Handshake slots promised to waiters that are about to start their helper (counted as taken),
    // and of those, the ones promised to strangers' streams (PeerListener.StrangersShare).
    private int _handshakesReserved;
    private int _strangerHandshakesReserved;
    // Transfer slots promised to intercepted streams (TryReserveSend) whose helpers have not started yet.
    private int _sendsReserved;
    private int _handshakeWaiters;
    private int _strangerHandshakeWaiters;
    // Peers told once that they proved themselves from an address not in their configuration.
    private readonly HashSet<string> _peersFromUnlistedAddresses = [];
    // Completed (and replaced) whenever a handshake slot frees: the waiters look again.
    private TaskCompletionSource _handshakeFreed = new(TaskCreationOptions.RunContinuationsAsynchronously);
    private int _nextId;
    private bool _closed;

    private readonly LogRateLimiter? _rejections;

    /// <summary>
    /// Runs helpers of <paramref name="helper"/>. What an incoming stream whose peer has not proved
    /// itself makes it log (refused, expired, ended) goes under <paramref name="rejections"/>, the
    /// peer port's one rate limit (null: one line each).
    /// </summary>
    public TransferManager(DaemonOptions options, string helper, string statsDirectory, ILogger logger, LogRateLimiter? rejections = null)
    {
        _rejections = rejections;
        _options = options;
        _helper = helper;
        _statsDirectory = statsDirectory;
        _logger = logger;
    }

    /// <summary>A running stream reported its counters, about twice a second (any thread).</summary>
    public event Action<StreamProgress>? Progressed;

    /// <summary>A stream ended (any thread).</summary>
    public event Action<TransferOutcome>? StreamFinished;

    /// <summary>The last stream of a guest in one direction ended: (outcomes of the trip's streams).</summary>
    public event Action<IReadOnlyList<TransferOutcome>>? TripFinished;

    // Under _gate: the transfer slots taken (transfer:max_concurrent), by one count everywhere.
    private int SlotsTaken => _running.Values.Count(r => r.Authenticated) + _sendsReserved;

    /// <summary>
    /// Takes a transfer slot for a sending helper that <see cref="StartSend"/> with
    /// <c>reserved</c> will start; false when none is free. Transparent mode asks before it hands
    /// a connection on, so that a stream over the limit is carried at stock cost rather than closed.
    /// </summary>
    public bool TryReserveSend()
    {
        lock (_gate)
        {
            if (_closed || SlotsTaken >= _options.MaxTransfers)
                return false;
            _sendsReserved++;
            return true;
        }
    }

    /// <summary>Gives back a slot <see cref="TryReserveSend"/> took for a send that will not start.</summary>
    public void ReleaseSend()
    {
        lock (_gate)
            _sendsReserved--;
    }

    /// <summary>Helpers running now.</summary>
    public int Active
    {
        get
        {
            lock (_gate)
                return _running.Count;
        }
    }

    /// <summary>The peer an authenticated incoming stream of the guest comes from now; null if none runs.</summary>
    public string? ReceivingFrom(Guid uuid)
    {
        lock (_gate)
            return ArrivingFrom(uuid);
    }

    // Under _gate. Every authenticated receive of a guest has one peer (OnAuthenticated stops any other).
    private string? ArrivingFrom(Guid uuid) =>
        _running.Values.FirstOrDefault(r => r.Uuid == uuid && r.Direction == TransferDirection.Receive && r.Authenticated)?.Peer;

    /// <summary>
    /// What a new memory connection of the guest's QEMU follows, as its send helper's argument:
    /// null while no memory stream of the guest is being sent from here (it is the main stream);
    /// <c>--follows-main</c> (a multifd channel, or the post-copy preempt channel if QEMU keeps it
    /// silent); <c>--post-copy-armed</c> while a memory stream of the guest is armed for post-copy
    /// (its helper's latest report, <see cref="TransferProgress.PostCopyArmed"/>): a silent one is
    /// the preempt channel at once.
    /// </summary>
    internal string? FollowerArgument(Guid uuid)
    {
        lock (_gate)
        {
            var sending = SendingMemory().Where(r => r.Uuid == uuid).ToList();
            return sending.Count == 0 ? null : sending.Any(r => r.PostCopyArmed) ? "--post-copy-armed" : "--follows-main";
        }
    }

    /// <summary>The guest whose memory stream is being sent to <paramref name="targetPort"/> on <paramref name="peer"/> (transparent mode), and whether that stream is armed for post-copy; null if none.</summary>
    public OutgoingMemory? MemoryGoingTo(string peer, ushort targetPort)
    {
        lock (_gate)
        {
            // The armed stream if there is one, else the latest: a helper of an earlier trip to a
            // reused port may still be ending, and multifd channels share their main's port.
            var going = SendingMemory().Where(r => r.Peer == peer && r.TargetPort == targetPort)
                .OrderByDescending(r => r.PostCopyArmed).ThenByDescending(r => r.Id).FirstOrDefault();
            return going is null ? null : new OutgoingMemory(going.Uuid, going.PostCopyArmed);
        }
    }

    // Under the gate.
    private IEnumerable<Running> SendingMemory() => _running.Values.Where(r => r.Direction == TransferDirection.Send && r.Kind == StreamKind.Mig);

    /// <summary>True while any stream of the guest runs (a receiving one from a stranger's address once its peer proved itself).</summary>
    public bool IsBusy(Guid uuid)
    {
        // A receiver still authenticating counts when it came from a configured peer's address (its
        // store must not be evicted under it before it opens it), not a stranger's: anyone who saw a
        // route frame could otherwise hold off retention, a forget, or the settling of a pending trip.
        // Either expires within HandshakeDeadline.
        lock (_gate)
            return _running.Values.Any(r => r.Uuid == uuid && (r.Authenticated || !r.Stranger));
    }

    /// <summary>Linux's SIGCONT: the one a receiving memory helper takes as "the guest runs here" (its default action does nothing).</summary>
    internal const int GuestRunsSignal = 18;

    /// <summary>
    /// The guest runs on this host now (libvirt resumed it here after a migration): tells its
    /// receiving memory helpers, whose store commits wait for that (bfmig-transfer's
    /// <c>--commit-after-resume</c>). Returns how many were told.
    /// </summary>
    public int GuestRuns(Guid uuid)
    {
        Running[] receiving;
        lock (_gate)
            receiving = [.. _running.Values.Where(r => r.Uuid == uuid && r.Direction == TransferDirection.Receive && r.Kind == StreamKind.Mig)];
        int told = 0;
        foreach (var r in receiving)
        {
            try
            {
                r.Child.Signal(GuestRunsSignal);
                told++;
            }
            catch (System.ComponentModel.Win32Exception)
            {
                // Its commit starts at its own limit instead (MigReceiver.CommitWaitLimit).
            }
        }
        return told;
    }

    /// <summary>The peer the guest's latest outgoing stream went to (where it is going or went).</summary>
    public string? LastOutgoingPeer(Guid uuid)
    {
        lock (_gate)
            return _lastOutgoingPeer.GetValueOrDefault(uuid);
    }

    /// <summary>The peer the guest's latest incoming stream came from.</summary>
    public string? LastIncomingPeer(Guid uuid)
    {
        lock (_gate)
            return _lastIncomingPeer.GetValueOrDefault(uuid);
    }

    /// <summary>
    /// Hands a connection from the local QEMU (accepted on <c>RUNTIME/PEER/GUEST.KIND</c>) to a
    /// sending helper. Takes ownership of <paramref name="qemu"/>; returns false (and closes it,
    /// so QEMU fails the migration and keeps the guest) when refused.
    /// </summary>
    public bool StartSend(string guest, Guid uuid, PeerOptions peer, StreamKind kind, Socket qemu, IReadOnlyList<DomainDisk> disks, ushort targetPort = 0,
        bool reserved = false)
    {
        List<string> args;
        try
        {
            args = new List<string>
            {
                "send", "--kind", KindArg(kind), "--fd", "3",
                "--peer", TcpArgument(peer.Host, peer.Port),
                "--guest", uuid.ToString("D"), "--peer-name", peer.Name,
                "--store", _options.StateDirectory, "--name", _options.HostName,
            };
            if (_options.AuthMode == PeerAuthMode.Tls)
            {
                // This host connects: it is the TLS client, as libvirt is when it migrates to qemu+tls://PEER.
                args.AddRange(["--tls-cert", _options.TlsClientCertificate, "--tls-key", _options.TlsClientKey, "--tls-ca", _options.TlsCaCertificate]);
                if (PeerCredentials.ReceiverName(_options, peer) is { } receiver)
                    args.AddRange(["--tls-peer-name", receiver]);
                args.AddRange(CrlArguments());
            }
            if (targetPort != 0)
                args.AddRange(["--target-port", targetPort.ToString(CultureInfo.InvariantCulture)]);
            if (kind == StreamKind.Mig && FollowerArgument(uuid) is { } follows)
                args.Add(follows);
        }
        catch when (reserved)
        {
            // Not started: the slot TryReserveSend took goes back.
            ReleaseSend();
            throw;
        }
        return Start(TransferDirection.Send, guest, uuid, peer.Name, kind, qemu, args, disks, targetPort, reserved);
    }

    /// <summary>
    /// Hands an accepted peer connection to a receiving helper that connects to the local QEMU at
    /// <paramref name="local"/> (<c>unix:PATH</c>, or <c>tcp:ADDRESS:PORT</c> in transparent mode).
    /// Takes ownership of <paramref name="peerSocket"/>. <paramref name="guestMemoryBytes"/> (the
    /// incoming domain's, 0 when unknown) bounds the RAM layout the peer may declare.
    /// <paramref name="routeFirst"/>: a route frame precedes the hello. <paramref name="authenticated"/>
    /// runs once the peer has proved it is <paramref name="peerName"/> and the stream took a
    /// transfer slot: what the daemon records of the arrival waits for that, never on a claim.
    /// <paramref name="stranger"/>: the connection comes from an address of no configured peer, and
    /// takes at most the strangers' share of the handshake slots and waiters.
    /// </summary>
    public async Task<bool> StartReceiveAsync(string guest, Guid uuid, string peerName, StreamKind kind, string local, Socket peerSocket,
        IReadOnlyList<DomainDisk> disks, long guestMemoryBytes = 0, bool routeFirst = false, Action? authenticated = null, bool stranger = false)
    {
        string remote = peerSocket.RemoteEndPoint?.ToString() ?? "?";
        if (await ReserveHandshakeAsync(guest, kind, stranger).ConfigureAwait(false) is { } refusal)
        {
            using (peerSocket)
                Refuse(TransferDirection.Receive, kind, guest, peerSocket, refusal);
            return false;
        }
        var args = new List<string>
        {
            "receive", "--kind", KindArg(kind), "--fd", "3", "--connect", local,
            "--guest", uuid.ToString("D"), "--store", _options.StateDirectory, "--name", _options.HostName, "--peer-name", peerName,
        };
        // The socket there is the destination QEMU's: the helper talks only to this guest's. (A
        // transparent-mode TCP target has no SO_PEERCRED: bfmigd checked, from /proc, that the
        // guest's own QEMU holds that listener before it named it.)
        if (local.StartsWith("unix:", StringComparison.Ordinal))
            args.AddRange(["--qemu-pid-file", GuestQemu.PidFile(_options.QemuPidDirectory, guest)]);
        if (kind == StreamKind.Mig && guestMemoryBytes > 0)
            args.AddRange(["--max-ram", guestMemoryBytes.ToString(CultureInfo.InvariantCulture)]);
        // Its store's commit waits for the guest to run here (GuestRuns), off libvirt's last fsync before the resume.
        if (kind == StreamKind.Mig)
            args.Add("--commit-after-resume");
        if (_options.AuthMode == PeerAuthMode.Tls)
        {
            args.AddRange(["--tls-cert", _options.TlsCertificate, "--tls-key", _options.TlsKey, "--tls-ca", _options.TlsCaCertificate]);
            // The route named a configured peer (the listener checked): its client certificate must name that peer, not just any host of the CA.
            if (PeerCredentials.SenderNames(_options, peerName) is { } senders)
                args.AddRange(["--tls-peer-name", senders]);
            args.AddRange(CrlArguments());
        }
        if (routeFirst)
            args.Add("--route-first");
        return Start(TransferDirection.Receive, guest, uuid, peerName, kind, peerSocket, args, disks, authenticated: authenticated,
            strangerAddress: stranger ? remote : null);
    }

    /// <summary>
    /// Waits until a handshake slot is free and reserves it for the caller's <see cref="Start"/>;
    /// null when reserved, else why not (too many waiting, no slot within <see cref="HandshakeDeadline"/>,
    /// or the daemon stopping). A stranger's stream waits for, and takes, only a place of the
    /// strangers' share (<see cref="PeerListener.StrangersShare"/>).
    /// </summary>
    private async Task<string?> ReserveHandshakeAsync(string guest, StreamKind kind, bool stranger)
    {
        var deadline = DateTime.UtcNow + HandshakeDeadline;
        bool waiting = false;
        try
        {
            while (true)
            {
                Task freed;
                lock (_gate)
                {
                    if (_closed)
                        return "the daemon is stopping";
                    if (Unauthenticated(strangers: false) + _handshakesReserved < HandshakeSlots
                        && (!stranger || Unauthenticated(strangers: true) + _strangerHandshakesReserved < PeerListener.StrangersShare(HandshakeSlots)))
                    {
                        _handshakesReserved++;
                        if (stranger)
                            _strangerHandshakesReserved++;
                        return null;
                    }
                    if (!waiting)
                    {
                        if (_handshakeWaiters >= MaxHandshakeWaiters)
                            return $"{HandshakeSlots} incoming streams are still authenticating and {MaxHandshakeWaiters} more wait";
                        if (stranger && _strangerHandshakeWaiters >= PeerListener.StrangersShare(MaxHandshakeWaiters))
                            return $"{PeerListener.StrangersShare(MaxHandshakeWaiters)} streams from addresses of no configured peer already wait for a handshake slot";
                        _handshakeWaiters++;
                        if (stranger)
                            _strangerHandshakeWaiters++;
                        waiting = true;
                        DaemonLog.HandshakeQueued(_logger, KindArg(kind), guest, HandshakeSlots);
                    }
                    freed = _handshakeFreed.Task;
                }
                var left = deadline - DateTime.UtcNow;
                if (left <= TimeSpan.Zero || await Task.WhenAny(freed, Task.Delay(left)).ConfigureAwait(false) != freed)
                    return $"no handshake slot freed within {(int)HandshakeDeadline.TotalSeconds} s ({HandshakeSlots} incoming streams still authenticating)";
            }
        }
        finally
        {
            if (waiting)
            {
                lock (_gate)
                {
                    _handshakeWaiters--;
                    if (stranger)
                        _strangerHandshakeWaiters--;
                }
            }
        }
    }

    // Under _gate: receiving helpers whose peer has not authenticated yet (strangers: only those of strangers' connections).
    private int Unauthenticated(bool strangers) => _running.Values.Count(r => !r.Authenticated && (!strangers || r.Stranger));

    // Under _gate: a reserved handshake slot is given back (its helper did not start) or passes to the started helper.
    private void TakeBackReservation(bool stranger)
    {
        _handshakesReserved--;
        if (stranger)
            _strangerHandshakesReserved--;
    }

    // Under _gate: the reserved slot's helper did not start.
    private void ReleaseReservedHandshake(bool stranger)
    {
        TakeBackReservation(stranger);
        HandshakeSlotFreed();
    }

    // Under _gate: a receiving helper authenticated, or ended before it did.
    private void HandshakeSlotFreed()
    {
        var freed = _handshakeFreed;
        _handshakeFreed = new(TaskCreationOptions.RunContinuationsAsynchronously);
        freed.TrySetResult();
    }

    private void Refuse(TransferDirection direction, StreamKind kind, string guest, Socket socket, string refusal)
    {
        if (direction == TransferDirection.Receive)
            Unproven(() => DaemonLog.PeerRejected(_logger, socket.RemoteEndPoint?.ToString() ?? "?", $"{KindArg(kind)} stream of guest {guest} refused: {refusal}"));
        else
            DaemonLog.TransferRefused(_logger, KindArg(kind), guest, refusal);
    }

    // A line about a stream whose peer has not proved itself: under the peer port's one rate limit.
    private void Unproven(Action line) => PeerListener.LogRejection(_logger, _rejections, line);

    private IEnumerable<string> CrlArguments() => PeerCredentials.RevocationList(_options) is { } crl ? ["--tls-crl", crl] : [];

    /// <summary>The helper's <c>--image</c> arguments: every export name of every file-backed or block-device disk.</summary>
    public static IEnumerable<string> ImageArguments(IReadOnlyList<DomainDisk> disks) =>
        disks.SelectMany(d => d.ExportNames.SelectMany(e => new[] { "--image", d.Image.ToArgument(e) }));

    // reserved: a send whose slot TryReserveSend took (it is counted as taken until now).
    // authenticated: a receiver's, run once its peer authenticated (OnAuthenticated).
    // stranger: a receiver's connection from this address of no configured peer (its reserved handshake slot was of their share).
    private bool Start(TransferDirection direction, string guest, Guid uuid, string peer, StreamKind kind, Socket socket, List<string> args,
        IReadOnlyList<DomainDisk> disks, ushort targetPort = 0, bool reserved = false, Action? authenticated = null, string? strangerAddress = null)
    {
        bool stranger = strangerAddress is not null;
        using (socket)
        {
            int id;
            string? refusal;
            lock (_gate)
            {
                if (reserved)
                    _sendsReserved--;
                int transfers = SlotsTaken;
                refusal = _closed ? "the daemon is stopping"
                    : transfers >= _options.MaxTransfers ? $"{transfers} transfers already running (transfer:max_concurrent = {_options.MaxTransfers})"
                    : null;
                id = ++_nextId;
                if (refusal is not null && direction == TransferDirection.Receive)
                    ReleaseReservedHandshake(stranger);
            }
            if (refusal is not null)
            {
                Refuse(direction, kind, guest, socket, refusal);
                return false;
            }
            var statsPath = Path.Combine(_statsDirectory, $"{id}-{uuid:D}-{KindArg(kind)}.json");
            args.AddRange(["--stats", statsPath]);
            if (_options.AuthMode == PeerAuthMode.Psk && _options.PskFile is not null)
                args.AddRange(["--psk-file", _options.PskFile]);
            args.AddRange(["--compress", _options.Compression.ToString().ToLowerInvariant()]);
            if (kind == StreamKind.Nbd)
            {
                args.AddRange(ImageArguments(disks));
                args.AddRange(["--qemu-user", _options.QemuUser, "--rehash-rate", _options.RehashRateMBps.ToString(CultureInfo.InvariantCulture)]);
            }
            args.AddRange(["--progress-fd", ProgressFd.ToString(CultureInfo.InvariantCulture)]);
            ChildProcess child;
            lock (_gate)
            {
                AnonymousPipeServerStream? progress = null;
                try
                {
                    // In here: a pipe that cannot be made (no descriptor left) gives the reserved slot back like a failed start.
                    progress = new AnonymousPipeServerStream(PipeDirection.In, HandleInheritability.None);
                    // Under the lock so that shutdown sees every child it must wait for.
                    int progressWriteEnd = (int)progress.ClientSafePipeHandle.DangerousGetHandle();
                    child = ChildProcess.Start(_helper, args, [((int)socket.Handle, HelperFd), (progressWriteEnd, ProgressFd)]);
                }
                catch (Exception e) when (e is System.ComponentModel.Win32Exception or IOException or ArgumentException)
                {
                    progress?.Dispose();
                    if (direction == TransferDirection.Receive)
                        ReleaseReservedHandshake(stranger);
                    DaemonLog.TransferRefused(_logger, KindArg(kind), guest, $"cannot start {_helper}: {e.Message}");
                    return false;
                }
                // Only the child writes: our copy would keep the pipe open past its exit.
                progress.DisposeLocalCopyOfClientHandle();
                var running = new Running(id, direction, guest, uuid, peer, kind, child, statsPath, disks) { TargetPort = targetPort, WhenAuthenticated = authenticated, StrangerAddress = strangerAddress };
                running.ProgressDone = Task.Run(() => ReadProgressAsync(running, progress));
                _running[id] = running;
                // The receiving helper now counts as unauthenticated itself, in place of the slot ReserveHandshakeAsync reserved.
                if (direction == TransferDirection.Receive)
                    TakeBackReservation(stranger);
                // A sending helper was started for the local QEMU: it is a transfer from the start. A receiving
                // one becomes one when its peer has authenticated (until then its claimed name is not recorded).
                if (direction == TransferDirection.Send)
                    JoinTrip(running);
                else
                    _ = ExpireHandshakeAsync(running);
                // A receiver's peer has proved nothing yet: its line goes under the peer port's rate limit (a flood is not a line each).
                if (direction == TransferDirection.Send)
                    DaemonLog.TransferStarted(_logger, id, DirectionText(direction), KindArg(kind), guest, peer, child.Pid);
                else
                    Unproven(() => DaemonLog.TransferStarted(_logger, id, DirectionText(direction), KindArg(kind), guest, peer, child.Pid));
                var watcher = WatchAsync(running);
                _watchers.Add(watcher);
                _ = watcher.ContinueWith(t =>
                {
                    lock (_gate)
                        _watchers.Remove(t);
                }, TaskScheduler.Default);
            }
            return true;
        }
    }

    // Under _gate.
    private void JoinTrip(Running running)
    {
        running.Authenticated = true;
        if (running.Direction == TransferDirection.Receive)
            HandshakeSlotFreed();
        var key = (running.Uuid, running.Direction);
        if (!_trips.TryGetValue(key, out var trip))
            _trips[key] = trip = new Trip();
        trip.Active++;
        if (running.Direction == TransferDirection.Send)
            _lastOutgoingPeer[running.Uuid] = running.Peer;
        else
            _lastIncomingPeer[running.Uuid] = running.Peer;
    }

    /// <summary>The receiving helper reported that its peer authenticated: it takes a transfer slot now, or is stopped when none is free.</summary>
    private void OnAuthenticated(Running running)
    {
        string? refusal;
        lock (_gate)
        {
            if (running.Authenticated || !_running.ContainsKey(running.Id))
                return;
            // Two first streams from two peers may both have been routed before either proved
            // itself: the trip is the one whose peer proved itself first.
            var arriving = ArrivingFrom(running.Uuid);
            refusal = arriving is not null && arriving != running.Peer ? $"the guest is arriving from {arriving}, not from {running.Peer}"
                : _closed || SlotsTaken >= _options.MaxTransfers ? $"no transfer slot free once its peer authenticated (transfer:max_concurrent = {_options.MaxTransfers})"
                : null;
            if (refusal is null)
                JoinTrip(running);
        }
        if (refusal is not null)
        {
            DaemonLog.TransferRefused(_logger, KindArg(running.Kind), running.Guest, refusal);
            running.Child.Signal(15);
            return;
        }
        // A real peer from an address missing from its configuration works, but with the strangers' share: say so, once.
        bool tell;
        lock (_gate)
            tell = running.StrangerAddress is not null && _peersFromUnlistedAddresses.Add(running.Peer);
        if (tell)
            DaemonLog.PeerFromUnlistedAddress(_logger, running.Peer, running.StrangerAddress!);
        try
        {
            running.WhenAuthenticated?.Invoke();
        }
        catch (Exception e)
        {
            // The progress reader calls this: the stream goes on whatever the record's fate.
            DaemonLog.MethodFailed(_logger, "recording an authenticated arrival", e.Message);
        }
    }

    private async Task ExpireHandshakeAsync(Running running)
    {
        await Task.WhenAny(running.Child.Exited, Task.Delay(HandshakeDeadline)).ConfigureAwait(false);
        lock (_gate)
        {
            if (running.Authenticated || running.Child.Exited.IsCompleted)
                return;
        }
        Unproven(() => DaemonLog.HandshakeExpired(_logger, running.Id, running.Guest, (int)HandshakeDeadline.TotalSeconds));
        running.Child.Signal(9);
    }

    private async Task WatchAsync(Running running)
    {
        int code;
        try
        {
            code = await running.Child.Exited.ConfigureAwait(false);
        }
        catch (System.ComponentModel.Win32Exception)
        {
            code = 255;
        }
        // Every progress signal of the stream comes before its end is reported (the pipe ends with the helper).
        await Task.WhenAny(running.ProgressDone, Task.Delay(TimeSpan.FromSeconds(2))).ConfigureAwait(false);
        var stats = ReadStats(running.StatsPath);
        var error = code == 0 ? null : stats?.Error ?? $"exited with code {code} without writing statistics";
        bool joined;
        lock (_gate)
            joined = running.Authenticated;
        if (!joined)
        {
            // Its peer never proved who it is: not a stream of any trip, only a refused connection.
            lock (_gate)
            {
                _running.Remove(running.Id);
                HandshakeSlotFreed();
            }
            TryDelete(running.StatsPath);
            Unproven(() => DaemonLog.PeerRejected(_logger, $"transfer {running.Id}", $"{KindArg(running.Kind)} stream of guest {running.Guest} ended before its peer authenticated: {error ?? "closed"}"));
            return;
        }
        var outcome = new TransferOutcome(running.Guest, running.Uuid, running.Peer, StreamName(running.Kind), running.Direction, code, error, stats);
        if (stats?.StoreSkipped is { } noStore)
            DaemonLog.TransferWithoutStore(_logger, running.Id, KindArg(running.Kind), running.Guest, noStore);
        if (code == 0)
        {
            DaemonLog.TransferSucceeded(_logger, running.Id, DirectionText(running.Direction), KindArg(running.Kind), running.Guest, code,
                stats?.WireBytesOut + stats?.WireBytesIn ?? 0, stats?.StreamBytes ?? 0, stats?.Seconds ?? 0);
        }
        else
        {
            DaemonLog.TransferFailed(_logger, running.Id, DirectionText(running.Direction), KindArg(running.Kind), running.Guest, code, error!);
        }
        IReadOnlyList<TransferOutcome>? tripDone = null;
        lock (_gate)
        {
            _running.Remove(running.Id);
            var key = (running.Uuid, running.Direction);
            var trip = _trips[key];
            trip.Outcomes.Add(outcome);
            if (--trip.Active == 0)
            {
                _trips.Remove(key);
                tripDone = trip.Outcomes;
            }
        }
        TryDelete(running.StatsPath);
        Raise(() => StreamFinished?.Invoke(outcome));
        if (tripDone is not null)
            Raise(() => TripFinished?.Invoke(tripDone));
    }

    /// <summary>
    /// Refuses new streams, waits up to <paramref name="grace"/> for the running ones, then
    /// terminates the rest (SIGTERM, then SIGKILL after two seconds): QEMU then fails those
    /// migrations and the guests stay on the source.
    /// </summary>
    public async Task ShutdownAsync(TimeSpan grace)
    {
        Running[] running;
        Task[] watchers;
        lock (_gate)
        {
            _closed = true;
            HandshakeSlotFreed(); // the waiters look again, and see the daemon stopping
            running = [.. _running.Values];
            watchers = [.. _watchers];
        }
        var all = Task.WhenAll(running.Select(r => (Task)r.Child.Exited));
        if (await Task.WhenAny(all, Task.Delay(grace)).ConfigureAwait(false) != all)
        {
            var left = running.Where(r => !r.Child.Exited.IsCompleted).ToArray();
            DaemonLog.KillingTransfers(_logger, left.Length, (int)grace.TotalSeconds);
            foreach (var r in left)
                r.Child.Signal(15);
            if (await Task.WhenAny(all, Task.Delay(TimeSpan.FromSeconds(2))).ConfigureAwait(false) != all)
            {
                foreach (var r in left)
                    r.Child.Signal(9);
            }
        }
        // The outcome of each stream is logged and signalled before the daemon lets go of the bus.
        await Task.WhenAny(Task.WhenAll(watchers), Task.Delay(TimeSpan.FromSeconds(5))).ConfigureAwait(false);
    }

    private static void TryDelete(string path)
    {
        try
        {
            File.Delete(path);
        }
        catch (IOException)
        {
            // A stale statistics file in the private transfers directory harms nobody.
        }
    }

    private void Raise(Action action)
    {
        try
        {
            action();
        }
        catch (Exception e)
        {
            DaemonLog.MethodFailed(_logger, "transfer notification", e.Message);
        }
    }

    /// <summary>"mig" or "nbd", as the helper's --kind wants it.</summary>
    public static string KindArg(StreamKind kind) => kind == StreamKind.Mig ? "mig" : "nbd";

    /// <summary>The stream name used in signals: "memory" or "disk".</summary>
    public static string StreamName(StreamKind kind) => kind == StreamKind.Mig ? "memory" : "disk";

    private static string DirectionText(TransferDirection direction) => direction == TransferDirection.Send ? "send" : "receive";

    /// <summary>"tcp:HOST:PORT" as bfmig-transfer's <c>--peer</c> and <c>--connect</c> take it (an IPv6 address in brackets).</summary>
    internal static string TcpArgument(string host, int port) =>
        $"tcp:{(host.Contains(':', StringComparison.Ordinal) ? $"[{host}]" : host)}:{port.ToString(CultureInfo.InvariantCulture)}";

    private sealed record Running(int Id, TransferDirection Direction, string Guest, Guid Uuid, string Peer, StreamKind Kind, ChildProcess Child, string StatsPath,
        IReadOnlyList<DomainDisk> Disks)
    {
        /// <summary>Transparent mode, sending: the peer port QEMU aimed at (0 otherwise).</summary>
        public ushort TargetPort { get; init; }

        /// <summary>Receiving: what the daemon records once the peer authenticated (<see cref="StartReceiveAsync"/>).</summary>
        public Action? WhenAuthenticated { get; init; }

        /// <summary>Receiving: the address of no configured peer the connection came from (<see cref="PeerListener.StrangersShare"/>), else null.</summary>
        public string? StrangerAddress { get; init; }

        public bool Stranger => StrangerAddress is not null;

        public Task ProgressDone { get; set; } = Task.CompletedTask;

        /// <summary>Sending memory: the helper's latest report said the stream is armed for post-copy. Under the manager's gate.</summary>
        public bool PostCopyArmed { get; set; }

        /// <summary>Holds a transfer slot and belongs to its trip (always for a send; for a receive once its peer authenticated). Under the manager's gate.</summary>
        public bool Authenticated { get; set; }
    }

    private sealed class Trip
    {
        public int Active { get; set; }

        public List<TransferOutcome> Outcomes { get; } = [];
    }
}
