using System.Diagnostics;
using System.Globalization;
using System.Net.Sockets;
using System.Net;
using BFMig.Contracts;
using BFMig.Daemon.Api;
using BFMig.Daemon.Checkpoints;
using BFMig.Daemon.Configuration;
using BFMig.Daemon.Guests;
using BFMig.Daemon.Logging;
using BFMig.Daemon.Sockets;
using BFMig.Daemon.Transfers;
using BFMig.Daemon.Transparent;
using BFMig.Native.Libvirt;
using BFMig.Native.Linux;
using BFMig.Native;
using BFMig.Transfer.Disk;
using BFMig.Transfer.Wire;
using BFMig.Transfer;
using Microsoft.Extensions.Logging;

namespace BFMig.Daemon;

/// <summary>
/// bfmigd: owns <c>org.bfmig.BFMig1</c>, follows libvirt, keeps the explicit-mode sockets, runs
/// the data path (one bfmig-transfer per stream) and records where each guest is.
/// Start with <see cref="Start"/>, stop with <see cref="StopAsync"/>.
/// </summary>
public sealed partial class BfmigDaemon : IGuestEvents, IManagerService, ITransparentHost, IAsyncDisposable
{
    /// <summary>Installed location of the transfer helper.</summary>
    public const string DefaultHelper = DefaultPaths.TransferHelper;

    private readonly DaemonOptions _options;
    private readonly ILogger _logger;
    private readonly ILoggerFactory _loggers;
    private readonly GuestStateStore _store;
    private readonly SplitBrainGuard _guard;

    /// <summary>One rate limit for every refusal of the peer port (listener, helpers, checkpoint exchange): a flood costs a few lines.</summary>
    private readonly LogRateLimiter _peerRejections;
    private readonly CancellationTokenSource _stop = new();
    private readonly TaskCompletionSource _stopped = new(TaskCreationOptions.RunContinuationsAsynchronously);
    // Set when Start has returned or thrown: a piece that fails during Start stops the daemon only
    // after it, so that the stop finds (and closes) every piece Start made.
    private readonly TaskCompletionSource _started = new(TaskCreationOptions.RunContinuationsAsynchronously);
    private readonly Stopwatch _uptime = Stopwatch.StartNew();
    private readonly GuestSessions _sessions;
    private DaemonBus? _bus;
    private LibvirtWatcher? _libvirt;
    private Task _libvirtTask = Task.CompletedTask;
    private MigrationSockets? _sockets;
    private TransferManager? _transfers;
    private PeerListener? _peers;
    private CheckpointKeeper? _checkpoints;
    private RetentionKeeper? _retention;
    private Task _retentionTask = Task.CompletedTask;
    private Task _peerTask = Task.CompletedTask;
    private int _stopping;
    private readonly DepartureJoin _departures;
    // Per guest, when the first stream of an arrival under way started (see QueueSealAfterFailedArrival).
    private readonly System.Collections.Concurrent.ConcurrentDictionary<Guid, DateTimeOffset> _arrivalStreamsSince = new();
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
        _guard = new SplitBrainGuard(_store, _time);
        _sessions = new GuestSessions(_store, _time, loggers.CreateLogger("bfmigd.guests"));
        _peerRejections = new LogRateLimiter(10, TimeSpan.FromSeconds(10), _time);
        _guard.IncomingMigrationAnnounced += guest => DaemonLog.IncomingMigration(_logger, guest);
        _guard.UnusableRecord += warning => DaemonLog.SplitBrainRecordUnusable(_logger, warning);
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

    /// <summary>How often the sockets are checked against libvirt's running guests (tests shorten it).</summary>
    internal TimeSpan GuestAuditInterval { get; init; } = TimeSpan.FromSeconds(60);

    /// <summary>How long a difference the audit finds must last before it counts as a missed event (tests shorten it).</summary>
    internal TimeSpan GuestAuditConfirm { get => _socketAudit.Confirm; init => _socketAudit = new SocketAudit(value); }

    private readonly SocketAudit _socketAudit = new(TimeSpan.FromSeconds(30));

    internal CheckpointKeeper? Checkpoints => _checkpoints;

    internal RetentionKeeper? Retention => _retention;

    /// <summary>
    /// Checks what the configuration names (users, helper), prepares the directories, takes the
    /// bus name and starts following libvirt and accepting peers. Throws
    /// <see cref="ConfigurationException"/> for a setting that cannot work.
    /// </summary>
    public void Start()
    {
        try
        {
            StartPieces();
        }
        finally
        {
            _started.TrySetResult();
        }
    }

    private void StartPieces()
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
        var helper = StartupChecks.LocateHelper(_options);
        if (_options.AuthMode == PeerAuthMode.Psk && !File.Exists(_options.PskFile))
            throw new ConfigurationException($"auth:psk_file = '{_options.PskFile}': no such file");
        if (_options.AuthMode == PeerAuthMode.Psk && PskPeerAuthenticator.KeyFileProblem(_options.PskFile!) is { } pskProblem)
            throw new ConfigurationException($"auth:psk_file: {pskProblem}");
        _dataPathOff = StartupChecks.MissingTlsFile(_options);
        if (_dataPathOff is not null)
            DaemonLog.DataPathOff(_logger, _dataPathOff);

        Directory.CreateDirectory(_options.StateDirectory, UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.UserExecute);
        var transfersDir = Path.Combine(_options.RuntimeDirectory, ".transfers");
        _sockets = new MigrationSockets(_options, user.Uid, group.Gid, _loggers.CreateLogger("bfmigd.sockets"), OnQemuConnected);
        _sockets.PrepareDirectories();
        Directory.CreateDirectory(transfersDir, UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.UserExecute);
        var transfersLog = _loggers.CreateLogger("bfmigd.transfers");
        _transfers = new TransferManager(_options, helper, transfersDir, transfersLog, _peerRejections);
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

        _libvirt = new LibvirtWatcher(_options.LibvirtUri, this, _loggers.CreateLogger("bfmigd.libvirt")) { AuditInterval = GuestAuditInterval };
        _libvirtTask = Supervise("the libvirt watcher", Task.Run(() => _libvirt.RunAsync(_stop.Token)), runsUntilStop: true);
        var watcher = _libvirt;
        _checkpoints = new CheckpointKeeper(_options, watcher.OpenDomain, new ImageBitmaps(), _loggers.CreateLogger("bfmigd.checkpoints"), _time, _stop.Token,
            qemuMonitor: _qemuMonitor, rejections: _peerRejections);

        var transfers = _transfers;
        _retention = new RetentionKeeper(_store, _sessions, _options.Retention, transfers.IsBusy, _time, _loggers.CreateLogger("bfmigd.retention"));
        // Without retention limits the keeper has nothing to do and returns at once.
        _retentionTask = Supervise("the retention keeper", Task.Run(() => _retention.RunAsync(_stop.Token)), runsUntilStop: false);

        if (_dataPathOff is null)
        {
            _peers = new PeerListener(StartupChecks.ListenEndPoint(_options), RoutePeer, AcceptPeerAsync, _loggers.CreateLogger("bfmigd.peers"), _peerRejections,
                PeerListener.PeerSources(_options.Peers));
            _peerTask = Supervise("the peer listener", _peers.RunAsync(), runsUntilStop: true);
            _transparent = TransparentMode.Start(_options, user.Uid, this, _loggers.CreateLogger("bfmigd.transparent"));
            if (_transparent.IsOn)
                Supervise("transparent mode's listener", _transparent.Running, runsUntilStop: true);
        }
    }

    /// <summary>
    /// A background piece that fails (libvirt's library unloadable, a bug), or that ends although it
    /// should run until the stop, would leave the daemon up, owning its bus name and silently
    /// half-working: no guest followed, so no sockets and no trips, or a port nobody serves.
    /// Stopping instead names the cause, and systemd restarts the daemon; transparent mode's
    /// redirect goes with the stop, so migrations meanwhile go at stock cost.
    /// </summary>
    private Task Supervise(string component, Task task, bool runsUntilStop)
    {
        _ = task.ContinueWith(async ended =>
        {
            await _started.Task.ConfigureAwait(false);
            if (Volatile.Read(ref _stopping) != 0 || (!ended.IsFaulted && !runsUntilStop))
                return;
            var cause = ended.Exception?.InnerException ?? ended.Exception;
            DaemonLog.ComponentFailed(_logger, component, cause?.Message ?? "it ended on its own", cause);
            await StopAsync(component + " failed").ConfigureAwait(false);
        }, CancellationToken.None, TaskContinuationOptions.ExecuteSynchronously, TaskScheduler.Default).Unwrap();
        return task;
    }

    /// <summary>Transparent mode's state ("on: ..." or "off: why").</summary>
    public string TransparentState => _transparent?.State ?? (_dataPathOff is { } off ? "off: the data path is off: " + off : "off: not started");

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
            // A piece that failed was logged when it did (Supervise): here it has only ended.
            var pieces = Task.WhenAll(_libvirtTask, _peerTask, _retentionTask, _transparent?.Running ?? Task.CompletedTask);
            await pieces.WaitAsync(TimeSpan.FromSeconds(10)).ConfigureAwait(ConfigureAwaitOptions.SuppressThrowing);
            if (pieces.IsCompleted)
                await _sessions.IdleAsync().WaitAsync(TimeSpan.FromSeconds(30)).ConfigureAwait(false);
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
}
