using System.Diagnostics;
using System.Globalization;
using System.Net;
using System.Net.Sockets;
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
using BFMig.Transfer.Engine;
using BFMig.Transfer.Store;
using BFMig.Transfer.Wire;
using Microsoft.Extensions.Logging;

namespace BFMig.Daemon;

/// <summary>
/// bfmigd: owns <c>org.bfmig.BFMig1</c>, follows libvirt, keeps the explicit-mode sockets, runs
/// the data path (one bfmig-transfer per stream) and records where each guest is.
/// Start with <see cref="Start"/>, stop with <see cref="StopAsync"/>.
/// </summary>
public sealed class BfmigDaemon : IGuestEvents, IManagerService, ITransparentHost, IAsyncDisposable
{
    /// <summary>Installed location of the transfer helper.</summary>
    public const string DefaultHelper = "/usr/libexec/bfmig/bfmig-transfer";

    // virDomainEventStoppedDetailType / virDomainEventResumedDetailType values for "migrated".
    private const int StoppedMigrated = 3;
    private const int ResumedMigrated = 1;
    private const int StartedMigrated = 1;

    private readonly DaemonOptions _options;
    private readonly ILogger _logger;
    private readonly ILoggerFactory _loggers;
    private readonly GuestStateStore _store;
    private readonly SplitBrainGuard _guard;

    /// <summary>One rate limit for every refusal of the peer port (listener, helpers, checkpoint exchange): a flood costs a few lines.</summary>
    private readonly LogRateLimiter _peerRejections;
    private readonly CancellationTokenSource _stop = new();
    private readonly TaskCompletionSource _stopped = new(TaskCreationOptions.RunContinuationsAsynchronously);
    private readonly Stopwatch _uptime = Stopwatch.StartNew();
    private readonly Lock _stateQueueGate = new();
    private Task _stateQueue = Task.CompletedTask;
    private Task _sealQueue = Task.CompletedTask;
    private DaemonBus? _bus;
    private LibvirtWatcher? _libvirt;
    private Task _libvirtTask = Task.CompletedTask;
    private MigrationSockets? _sockets;
    private TransferManager? _transfers;
    private PeerListener? _peers;
    private CheckpointKeeper? _checkpoints;
    private Task _peerTask = Task.CompletedTask;
    private int _stopping;
    private readonly DepartureJoin _departures;
    private readonly TripRecorder _trips;
    private readonly HashSet<Guid> _sharedDisksTold = [];
    private readonly DomainXmlCache _domainXml = new();
    private string? _dataPathOff;
    private TransparentMode? _transparent;
    private readonly TimeProvider _time;
    private readonly Func<LibvirtDomain, string, string>? _qemuMonitor;

    /// <summary>Guests with an Estimate running: QEMU measures one dirty rate per guest at a time.</summary>
    private readonly System.Collections.Concurrent.ConcurrentDictionary<Guid, bool> _estimating = new();

    /// <param name="options">The settings (see <see cref="DaemonConfiguration"/>).</param>
    /// <param name="loggers">Where the daemon logs.</param>
    /// <param name="time">The clock (rate limits, the split-brain guard, seals).</param>
    /// <param name="qemuMonitor">
    /// Sends a QMP command to a guest's QEMU and returns the reply; null: libvirt's
    /// qemu-monitor-command. Tests whose libvirt (the test driver) has no QEMU stand one in here.
    /// </param>
    public BfmigDaemon(DaemonOptions options, ILoggerFactory loggers, TimeProvider? time = null, Func<LibvirtDomain, string, string>? qemuMonitor = null)
    {
        _options = options;
        _time = time ?? TimeProvider.System;
        _qemuMonitor = qemuMonitor;
        _loggers = loggers;
        _logger = loggers.CreateLogger("bfmigd");
        _store = new GuestStateStore(options.StateDirectory);
        _guard = new SplitBrainGuard(_store, options.HostName, _time);
        _peerRejections = new LogRateLimiter(10, TimeSpan.FromSeconds(10), _time);
        _guard.IncomingMigrationAnnounced += guest => DaemonLog.IncomingMigration(_logger, guest);
        _departures = new DepartureJoin(OnDeparted, _time);
        _trips = new TripRecorder(_store, _time);
    }

    /// <summary>The options the daemon runs with.</summary>
    public DaemonOptions Options => _options;

    /// <summary>The peer data port actually bound (useful when <c>daemon:listen</c> asked for port 0).</summary>
    public int PeerPort => _peers?.LocalEndPoint.Port ?? 0;

    /// <summary>Completes once the daemon stopped (after <see cref="StopAsync"/>, or when the bus connection was lost).</summary>
    public Task Completion => _stopped.Task;

    /// <summary>The state directories (for tests and tools).</summary>
    public GuestStateStore Store => _store;

    /// <summary>Where the split-brain guard and socket bookkeeping stand.</summary>
    internal MigrationSockets? Sockets => _sockets;

    internal TransferManager? Transfers => _transfers;

    internal LibvirtWatcher? Libvirt => _libvirt;

    internal CheckpointKeeper? Checkpoints => _checkpoints;

    /// <summary>
    /// Checks what the configuration names (users, helper), prepares the directories, takes the
    /// bus name and starts following libvirt and accepting peers. Throws
    /// <see cref="ConfigurationException"/> for a setting that cannot work.
    /// </summary>
    public void Start()
    {
        DaemonLog.Starting(_logger, BuildInfo.Version, _options.HostName, _options.StateDirectory, _options.RuntimeDirectory);
        if (_options.Peers.Any(p => p.Name == _options.HostName))
            throw new ConfigurationException($"[peers:{_options.HostName}] has this host's own name (daemon:host_name); a peer must be another host");
        var user = UnixUsers.GetUser(_options.QemuUser)
            ?? throw new ConfigurationException($"daemon:qemu_user = '{_options.QemuUser}': no such user on this host");
        var group = UnixUsers.GetGroup(_options.QemuGroup)
            ?? throw new ConfigurationException($"daemon:qemu_group = '{_options.QemuGroup}': no such group on this host");
        var admins = _options.AdminGroup is { } adminGroup
            ? UnixUsers.GetGroup(adminGroup) ?? throw new ConfigurationException($"daemon:admin_group = '{adminGroup}': no such group on this host")
            : null;
        var helper = LocateHelper(_options);
        if (_options.AuthMode == PeerAuthMode.Psk && !File.Exists(_options.PskFile))
            throw new ConfigurationException($"auth:psk_file = '{_options.PskFile}': no such file");
        if (_options.AuthMode == PeerAuthMode.Psk && PskPeerAuthenticator.UnsafeModeProblem(_options.PskFile!) is { } pskProblem)
            throw new ConfigurationException($"auth:psk_file: {pskProblem}");
        _dataPathOff = MissingTlsFile(_options);
        if (_dataPathOff is not null)
            DaemonLog.DataPathOff(_logger, _dataPathOff);

        Directory.CreateDirectory(_options.StateDirectory, UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.UserExecute);
        var transfersDir = Path.Combine(_options.RuntimeDirectory, ".transfers");
        _sockets = new MigrationSockets(_options, user.Uid, group.Gid, _loggers.CreateLogger("bfmigd.sockets"), OnQemuConnected);
        _sockets.PrepareDirectories();
        Directory.CreateDirectory(transfersDir, UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.UserExecute);
        var transfersLog = _loggers.CreateLogger("bfmigd.transfers");
        _transfers = new TransferManager(_options, helper, transfersDir, transfersLog,
            (remote, reason) => PeerListener.LogRejection(transfersLog, _peerRejections, remote, reason));
        _transfers.Progressed += OnProgress;
        _transfers.TripFinished += OnTripFinished;

        var api = new ManagerApi(this, _loggers.CreateLogger("bfmigd.api"), admins,
            new CallRateLimit(ManagerApi.EstimatesPerMinute, TimeSpan.FromMinutes(1), _time),
            new LogRateLimiter(10, TimeSpan.FromSeconds(10), _time));
        _bus = DaemonBus.Open(_options.BusAddress, api, _loggers.CreateLogger("bfmigd.api"), reason =>
        {
            DaemonLog.BusLost(_logger, reason);
            _ = StopAsync("D-Bus connection lost");
        });
        DaemonLog.BusNameOwned(_logger, ManagerApi.BusName, _options.BusAddress ?? "the system bus");

        _libvirt = new LibvirtWatcher(_options.LibvirtUri, this, _loggers.CreateLogger("bfmigd.libvirt"));
        _libvirtTask = Task.Run(() => _libvirt.RunAsync(_stop.Token));
        var watcher = _libvirt;
        _checkpoints = new CheckpointKeeper(_options, watcher.OpenDomain, new ImageBitmaps(), _loggers.CreateLogger("bfmigd.checkpoints"), stop: _stop.Token,
            qemuMonitor: _qemuMonitor);

        if (_dataPathOff is null)
        {
            _peers = new PeerListener(ListenEndPoint(_options), RoutePeer, AcceptPeer, _loggers.CreateLogger("bfmigd.peers"), _peerRejections);
            _peerTask = _peers.RunAsync();
            _transparent = TransparentMode.Start(_options, user.Uid, this, _loggers.CreateLogger("bfmigd.transparent"));
        }
    }

    /// <summary>Transparent mode's state ("on: ..." or "off: why").</summary>
    public string TransparentState => _transparent?.State ?? (_dataPathOff is { } off ? "off: the data path is off: " + off : "off: not started");

    /// <summary>
    /// With auth:mode = tls, the first certificate or key file that is missing (the daemon then
    /// runs without a data path: state, guard and CLI keep working, migrations are refused).
    /// </summary>
    private static string? MissingTlsFile(DaemonOptions options)
    {
        if (options.AuthMode != PeerAuthMode.Tls)
            return null;
        foreach (var (key, file) in new[]
        {
            ("auth:tls_cert", options.TlsCertificate), ("auth:tls_key", options.TlsKey), ("auth:tls_ca", options.TlsCaCertificate),
            ("auth:tls_client_cert", options.TlsClientCertificate), ("auth:tls_client_key", options.TlsClientKey),
        })
        {
            if (!File.Exists(file))
                return $"{key} = '{file}' does not exist (auth:mode = tls uses libvirt's host certificates; or set auth:mode = psk)";
        }
        return null;
    }

    /// <summary>The helper to run: transfer:helper, else the installed one, else bfmig-transfer next to this program.</summary>
    public static string LocateHelper(DaemonOptions options)
    {
        if (options.TransferHelper is { } configured)
        {
            return File.Exists(configured) ? configured
                : throw new ConfigurationException($"transfer:helper = '{configured}': no such file");
        }
        if (File.Exists(DefaultHelper))
            return DefaultHelper;
        var beside = Path.Combine(AppContext.BaseDirectory, "bfmig-transfer");
        return File.Exists(beside) ? beside
            : throw new ConfigurationException($"transfer:helper is not set and neither {DefaultHelper} nor {beside} exists");
    }

    private static IPEndPoint ListenEndPoint(DaemonOptions options)
    {
        if (IPAddress.TryParse(options.ListenAddress, out var ip))
            return new IPEndPoint(ip, options.ListenPort);
        var addresses = Dns.GetHostAddresses(options.ListenAddress);
        return addresses.Length > 0 ? new IPEndPoint(addresses[0], options.ListenPort)
            : throw new ConfigurationException($"daemon:listen = '{options.ListenAddress}': the name has no address");
    }

    /// <summary>
    /// Stops: releases the bus name, stops accepting QEMU and peer connections, lets running
    /// transfers finish for <c>transfer:shutdown_grace_seconds</c>, then kills the rest.
    /// </summary>
    public async Task StopAsync(string reason)
    {
        if (Interlocked.Exchange(ref _stopping, 1) != 0)
        {
            await _stopped.Task.ConfigureAwait(false);
            return;
        }
        DaemonLog.Stopping(_logger, reason);
        try
        {
            // The redirect goes first: from here on, new migrations go straight to the peer.
            _transparent?.Dispose();
            _peers?.Dispose();
            _sockets?.Dispose();
            if (_transfers is not null)
                await _transfers.ShutdownAsync(TimeSpan.FromSeconds(_options.ShutdownGraceSeconds)).ConfigureAwait(false);
            await _stop.CancelAsync().ConfigureAwait(false);
            await Task.WhenAll(_libvirtTask, _peerTask, _transparent?.Running ?? Task.CompletedTask).WaitAsync(TimeSpan.FromSeconds(10)).ConfigureAwait(false);
            Task queue;
            lock (_stateQueueGate)
                queue = Task.WhenAll(_stateQueue, _sealQueue);
            await queue.WaitAsync(TimeSpan.FromSeconds(30)).ConfigureAwait(false);
        }
        catch (Exception e) when (e is TimeoutException or OperationCanceledException)
        {
            // Whatever did not end in time ends with the process.
        }
        finally
        {
            _bus?.Dispose();
            DaemonLog.Stopped(_logger);
            _stopped.TrySetResult();
        }
    }

    public ValueTask DisposeAsync() => new(StopAsync("disposed"));

    // ---- libvirt ----

    void IGuestEvents.Reconcile(IReadOnlyCollection<(Guid Uuid, string Name)> running)
    {
        _sockets?.Reconcile(running);
        foreach (var (uuid, _) in running)
            RefreshDomainXml(uuid);
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
                switch (e.Event)
                {
                    case LibvirtLifecycleEvent.Started or LibvirtLifecycleEvent.Resumed:
                        _sockets?.Ensure(uuid, name);
                        RefreshDomainXml(uuid);
                        // Running here again: the image the last trip left behind is in use, never capture its identity now.
                        _departures.GuestRunning(uuid);
                        if (e.Event == LibvirtLifecycleEvent.Resumed && e.Detail == ResumedMigrated)
                        {
                            QueueLocation(uuid, name, away: false, _transfers?.LastIncomingPeer(uuid));
                            QueueTripRecord(uuid, name, () => _trips.Arrived(uuid, _transfers?.LastIncomingPeer(uuid)));
                            _checkpoints?.OnArrived(uuid, name, _transfers?.LastIncomingPeer(uuid));
                        }
                        if (e.Event == LibvirtLifecycleEvent.Started && e.Detail != StartedMigrated)
                            QueueInvalidateIfAway(uuid, name);
                        if (e.Event == LibvirtLifecycleEvent.Started && e.Detail == StartedMigrated)
                            _trips.IncomingStarted(uuid);
                        break;
                    case LibvirtLifecycleEvent.Stopped:
                        _sockets?.Remove(uuid);
                        _trips.GuestStopped(uuid);
                        if (e.Detail == StoppedMigrated)
                        {
                            QueueLocation(uuid, name, away: true, _transfers?.LastOutgoingPeer(uuid));
                            _departures.SourceStopped(uuid, name);
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

    /// <summary>Records a departure or arrival off the event thread (it may wait for a helper's store lock).</summary>
    private void QueueLocation(Guid uuid, string name, bool away, string? peer)
    {
        lock (_stateQueueGate)
        {
            _stateQueue = _stateQueue.ContinueWith(_ =>
            {
                var location = away ? "away" : "here";
                try
                {
                    _store.SaveName(uuid, name);
                    var state = _store.RecordLocation(uuid, away, peer, TimeSpan.FromSeconds(60));
                    var peerText = away ? (state.Peer is null ? "" : $" at {state.Peer}") : (peer is null ? "" : $" (came from {peer})");
                    DaemonLog.LocationRecorded(_logger, name, uuid.ToString("D"), location, peerText);
                }
                catch (Exception e) when (e is IOException or UnauthorizedAccessException)
                {
                    DaemonLog.LocationFailed(_logger, name, uuid.ToString("D"), location, e.Message);
                }
            }, CancellationToken.None, TaskContinuationOptions.None, TaskScheduler.Default);
        }
    }

    /// <summary>
    /// The sending helper records "away" when its stream ends, but QEMU may still fail the
    /// migration after that (or the stream failed): then the guest keeps running here and must
    /// not stay recorded as away, or the split-brain guard would refuse its next start here.
    /// A successful migration stops the guest here (the Stopped/MIGRATED event records it); a
    /// source still paused is finishing; a source running again has stayed.
    /// </summary>
    private async Task ConfirmDepartureAsync(Guid uuid, string name)
    {
        var deadline = DateTime.UtcNow + TimeSpan.FromMinutes(2);
        try
        {
            while (DateTime.UtcNow < deadline)
            {
                await Task.Delay(TimeSpan.FromSeconds(3), _stop.Token).ConfigureAwait(false);
                var state = _libvirt?.GetState(uuid);
                if (state is null or LibvirtDomainState.Paused)
                    continue;
                if (state == LibvirtDomainState.Running && _transfers?.IsBusy(uuid) == false && _store.ReadState(uuid)?.Location == "away")
                    QueueLocation(uuid, name, away: false, peer: null);
                return;
            }
        }
        catch (OperationCanceledException)
        {
            // Stopping: the next start reconciles nothing here, the record stays as the helper left it.
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
        var verdicts = ImageCustody.Decide(disks, departure.Trip);
        QueueTripRecord(uuid, name, () => _trips.Departed(departure, verdicts, _transfers?.LastOutgoingPeer(uuid)));
        var untouched = verdicts.Where(v => !v.Carried).ToList();
        bool tell;
        lock (_sharedDisksTold)
            tell = untouched.Count > 0 && _sharedDisksTold.Add(uuid);
        if (tell)
            DaemonLog.DisksNotTouched(_logger, name, uuid.ToString("D"), string.Join("; ", untouched.Select(v => v.Why)));
        var maps = ImageCustody.SealableMaps(verdicts, departure.Trip);
        var cleaned = _checkpoints?.OnDeparted(uuid, name, ImageCustody.CarriedImages(verdicts)) ?? Task.CompletedTask;
        if (maps.Count > 0)
        {
            _ = cleaned.ContinueWith(_ => QueueSeal(uuid, name, maps), CancellationToken.None,
                TaskContinuationOptions.None, TaskScheduler.Default);
        }
    }

    private void QueueTripRecord(Guid uuid, string name, Func<TripRecord?> record) => Queue(() =>
    {
        try
        {
            if (record() is not { } r)
                return;
            DaemonLog.TripRecorded(_logger, name, uuid.ToString("D"), r.Direction, r.Summary, r.Peer.Length > 0 ? r.Peer : "?", r.Reason);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            DaemonLog.LocationFailed(_logger, name, uuid.ToString("D"), "trip record", e.Message);
        }
    });

    // ---- disk image identity (after a departure, only for carried disks) ----

    // Own chain, not the location queue: that one may wait up to 60 s for a helper's store lock,
    // and every second before the capture is a second in which a write to the image goes unseen.
    private void QueueSeal(Guid uuid, string name, IReadOnlyList<string> maps)
    {
        lock (_stateQueueGate)
            _sealQueue = _sealQueue.ContinueWith(_ => Seal(uuid, name, maps), CancellationToken.None, TaskContinuationOptions.None, TaskScheduler.Default);
    }

    private void Seal(Guid uuid, string name, IReadOnlyList<string> maps)
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
            DaemonLog.DiskIdentityCaptured(_logger, name, uuid.ToString("D"), map, result);
        }
    }

    /// <summary>
    /// The guest was started here other than by an incoming migration while recorded as away: its
    /// retained image is being written by a forked copy, so no map of it may be trusted again.
    /// (The identity check would see most such writes; this does not depend on timestamps.)
    /// </summary>
    private void QueueInvalidateIfAway(Guid uuid, string name) => Queue(() =>
    {
        if (_store.ReadState(uuid)?.Location != "away")
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
                DaemonLog.LocationFailed(_logger, name, uuid.ToString("D"), "disk map invalidated", e.Message);
            }
        }
    });

    private void Queue(Action action)
    {
        lock (_stateQueueGate)
            _stateQueue = _stateQueue.ContinueWith(_ => action(), CancellationToken.None, TaskContinuationOptions.None, TaskScheduler.Default);
    }

    /// <summary>Completes when every location update queued so far is written.</summary>
    public Task FlushStateAsync()
    {
        lock (_stateQueueGate)
            return _stateQueue;
    }

    // ---- data path ----

    private void OnQemuConnected(string guest, Guid uuid, PeerOptions peer, StreamKind kind, Socket connection)
    {
        if (_dataPathOff is { } why)
        {
            DaemonLog.TransferRefused(_logger, TransferManager.KindArg(kind), guest, why);
            connection.Dispose();
            return;
        }
        _checkpoints?.OnTripStarting(uuid, guest, peer);
        StreamStarting(uuid, TransferDirection.Send, kind, TripRoute.Explicit);
        _transfers!.StartSend(guest, uuid, peer, kind, connection, DisksOf(uuid, kind));
    }

    IReadOnlyCollection<(Guid Uuid, string Name)> ITransparentHost.RunningGuests() => _sockets?.Guests ?? [];

    bool ITransparentHost.HasTransferCapacity() => _transfers is { } t && t.Active < _options.MaxTransfers;

    bool ITransparentHost.StartSend(string guest, Guid uuid, PeerOptions peer, StreamKind kind, Socket qemu, ushort targetPort)
    {
        StreamStarting(uuid, TransferDirection.Send, kind, TripRoute.Transparent);
        _checkpoints?.OnTripStarting(uuid, guest, peer);
        return _transfers!.StartSend(guest, uuid, peer, kind, qemu, DisksOf(uuid, kind), targetPort);
    }

    /// <summary>
    /// A stream of the guest's trip reached BFMig: the trip record and the departure join must know
    /// before the trip ends. Explicit mode calls it for each connection on a socket; transparent
    /// mode calls it with <see cref="TripRoute.Transparent"/> for each redirected connection.
    /// </summary>
    internal void StreamStarting(Guid uuid, TransferDirection direction, StreamKind kind, TripRoute route)
    {
        _trips.StreamStarted(uuid, direction, kind, route);
        if (direction == TransferDirection.Send)
            _departures.StreamStarted(uuid);
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
    /// writes there), valid for the hook's 5 minutes. Without it such a migration would fail here.
    /// </summary>
    private bool HookMarkedIncoming(Guid uuid)
    {
        var marker = new FileInfo(Path.Combine(_options.RuntimeDirectory, "incoming", uuid.ToString("D")));
        return marker.Exists && marker.LinkTarget is null && _time.GetUtcNow() - marker.LastWriteTimeUtc <= TimeSpan.FromMinutes(5);
    }

    private PeerRoute RoutePeer(RouteRequest hello)
    {
        if (!_options.Peers.Any(p => p.Name == hello.SenderName))
            return new PeerRoute(null, $"sender '{hello.SenderName}' is not a configured peer ([peers:NAME] in bfmig.conf)");
        // Checked before anything costs more than a lookup: only a migration this host's own hook announced
        // (or one whose authenticated streams already run) gets a helper, a store or a checkpoint exchange.
        if (!_guard.ExpectsStreams(hello.Guest) && _transfers?.IsReceiving(hello.Guest) != true && !HookMarkedIncoming(hello.Guest))
            return new PeerRoute(null, $"no incoming migration of guest {hello.Guest:D} is expected here (this host's hook has not announced one)");
        var name = _libvirt?.LookupName(hello.Guest);
        if (name is null)
            return new PeerRoute(null, $"no guest {hello.Guest:D} here (the migration's prepare step has not run, or libvirt is unreachable)");
        return new PeerRoute(name, "");
    }

    private void AcceptPeer(RouteRequest hello, string guest, Socket connection)
    {
        if (hello.Kind == StreamKind.Control)
        {
            if (_checkpoints is { } keeper)
                _ = keeper.ServeAsync(connection);
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
            DaemonLog.TransparentTargetRefused(_logger, TransferManager.KindArg(hello.Kind), guest, hello.SenderName, hello.TargetPort,
                "the guest's QEMU does not listen on that port");
            connection.Dispose();
            return;
        }
        StreamStarting(hello.Guest, TransferDirection.Receive, hello.Kind, hello.TargetPort == 0 ? TripRoute.Explicit : TripRoute.Transparent);
        _transfers!.StartReceive(guest, hello.Guest, hello.SenderName, hello.Kind, local, connection, DisksOf(hello.Guest, hello.Kind),
            hello.Kind == StreamKind.Mig ? MemoryOf(hello.Guest) : 0, hello.FromRouteFrame);
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
        if (first.Direction == TransferDirection.Send)
        {
            _ = ConfirmDepartureAsync(first.Uuid, first.Guest);
            _departures.TripEnded(first.Uuid, first.Guest, outcomes);
        }
        var ok = outcomes.All(o => o.Ok);
        var message = string.Join("; ", outcomes.Select(o => o.Ok
            ? $"{o.Stream}: {o.Stats?.StreamBytes ?? 0} bytes carried, {(o.Stats?.WireBytesOut ?? 0) + (o.Stats?.WireBytesIn ?? 0)} on the wire"
            : $"{o.Stream}: failed (exit {o.ExitCode}): {o.Error}"));
        _bus?.TransferFinished(first.Guest, first.Peer, ok, message);
    }

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
            ListedLocation(r), r.State?.Peer ?? "", r.State?.Generation ?? 0, r.MemoryBytes, r.DiskBytes,
            r.State is null || r.State.Since == default ? 0 : r.State.Since.ToUnixTimeSeconds()))];

    /// <summary>
    /// "here" only while libvirt still knows the guest: one destroyed and undefined here (no
    /// migration) leaves its record saying "here", and listing it so would claim a guest that
    /// does not exist. The record itself stays (the retained state is still the peer's view).
    /// </summary>
    private string ListedLocation(GuestRecord r) =>
        r.Location == "here" && _libvirt?.IsDefined(r.Uuid) == false ? "undefined" : r.Location;

    /// <inheritdoc/>
    public IReadOnlyList<TripListing> ListTrips() =>
        [.. _store.List().Select(r => (r.Uuid, Trip: _trips.Read(r.Uuid))).Where(t => t.Trip is not null)
            .Select(t => new TripListing(t.Uuid.ToString("D"), t.Trip!.Direction, t.Trip.Path, t.Trip.MemoryOnly, t.Trip.Peer, t.Trip.Reason, t.Trip.AtUnixSeconds))];

    /// <inheritdoc/>
    public void Forget(string guest)
    {
        var record = FindRetained(guest);
        if (_transfers?.IsBusy(record.Uuid) == true)
            throw new DaemonApiException(DaemonErrors.Busy, $"a transfer of guest {guest} is running; wait for the migration to end, then forget it");
        try
        {
            _store.Delete(record.Uuid);
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
    private static async Task<(ulong Bytes, string Basis)> AddDirtyRateAsync(CheckpointKeeper keeper, Guid uuid, string peer, ulong bytes, ulong stock, string basis,
        CancellationToken ct)
    {
        if (keeper.ArrivalOf(uuid) is not { } arrival || arrival.Peer != peer)
            return (bytes, basis);
        var rate = await keeper.MeasureDirtyRateAsync(uuid, ct).ConfigureAwait(false);
        if (rate is not { } mibPerSecond)
            return (bytes, basis + "; QEMU's dirty rate could not be measured");
        var seconds = Math.Max(0, (DateTimeOffset.UtcNow - arrival.At).TotalSeconds);
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
