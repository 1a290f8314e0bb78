using System.Net.Sockets;
using BFMig.Daemon.Configuration;
using BFMig.Daemon.Logging;
using BFMig.Native.Linux;
using BFMig.Transfer.Wire;
using Microsoft.Extensions.Logging;

namespace BFMig.Daemon.Sockets;

/// <summary>A connection the local QEMU made to one of the explicit-mode sockets.</summary>
public delegate void QemuConnected(string guest, Guid uuid, PeerOptions peer, StreamKind kind, Socket connection);

/// <summary>
/// The explicit-mode sockets: for each running guest and each configured peer, listening unix
/// sockets <c>RUNTIME/PEER/GUEST.mig</c> and <c>.nbd</c> that the source libvirt points QEMU at
/// (<c>--migrateuri</c>, <c>--disks-uri</c>). Every directory belongs to root, so that a
/// compromised QEMU can neither swap a socket for a link nor plant one: <c>RUNTIME</c> and the
/// per-peer directories <c>root:qemu_group 0750</c>; sockets <c>root:qemu_group 0660</c>, given
/// their owner and mode in <c>RUNTIME/.bind</c> (root only) and only then renamed into place, so
/// no call as root ever follows a path another user could change. <c>RUNTIME/HOST/</c> (this
/// host's own name) is where the destination QEMU creates its listening sockets when a guest
/// migrates here: <c>root:qemu_group 1770</c>. A connection counts only when it comes from the
/// guest's own QEMU (SO_PEERCRED against libvirt's pid file, <see cref="GuestQemu"/>); the
/// receiving helper checks the same of the socket it connects to in <c>RUNTIME/HOST/</c>.
/// </summary>
public sealed class MigrationSockets : IDisposable
{
    /// <summary>Mode of the runtime and per-peer directories.</summary>
    public const UnixFileMode DirectoryMode = UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.UserExecute
        | UnixFileMode.GroupRead | UnixFileMode.GroupExecute;

    /// <summary>Mode of the own-host directory: the QEMU group creates its sockets there; sticky, so it removes only its own.</summary>
    public const UnixFileMode OwnDirectoryMode = UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.UserExecute
        | UnixFileMode.GroupRead | UnixFileMode.GroupWrite | UnixFileMode.GroupExecute | UnixFileMode.StickyBit;

    private const UnixFileMode PrivateMode = UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.UserExecute;
    private const string BindDirectory = ".bind";
    private static readonly TimeSpan RefusalReportInterval = TimeSpan.FromSeconds(10);

    /// <summary>Mode of every socket.</summary>
    public const UnixFileMode SocketMode = UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.GroupRead | UnixFileMode.GroupWrite;

    private const int MaxSocketPath = 107;
    private readonly DaemonOptions _options;
    private readonly uint _gid;
    private readonly ILogger _logger;
    private readonly QemuConnected _onConnected;
    private readonly Lock _gate = new();
    private readonly Dictionary<Guid, GuestSockets> _guests = [];
    private bool _disposed;
    private long _refusedSinceReport;
    private long _lastRefusalReport = long.MinValue;

    public MigrationSockets(DaemonOptions options, uint qemuUid, uint qemuGid, ILogger logger, QemuConnected onConnected)
    {
        _ = qemuUid; // Nothing here belongs to the QEMU user any more: the group grants access.
        _options = options;
        _gid = qemuGid;
        _logger = logger;
        _onConnected = onConnected;
    }

    /// <summary>Directory of this host's own incoming sockets (<c>RUNTIME/HOST</c>).</summary>
    public string OwnDirectory => Path.Combine(_options.RuntimeDirectory, _options.HostName);

    /// <summary>The socket path of a guest's stream towards a peer (or, with this host's name, towards here).</summary>
    public string SocketPath(string hostDirectory, string guest, StreamKind kind) =>
        Path.Combine(_options.RuntimeDirectory, hostDirectory, guest + (kind == StreamKind.Mig ? ".mig" : ".nbd"));

    /// <summary>
    /// Creates the runtime directory (root:qemu_group 0750), the private bind directory (root
    /// 0700), one directory per peer (root:qemu_group 0750) and the own-host directory
    /// (root:qemu_group 1770). Throws when that is impossible.
    /// </summary>
    public void PrepareDirectories()
    {
        var root = _options.RuntimeDirectory;
        // The runtime directory's parent (/run) is root's: creating and changing it by path is safe.
        Directory.CreateDirectory(root);
        UnixUsers.ChangeOwner(root, 0, _gid);
        UnixUsers.ChangeMode(root, DirectoryMode);
        // Below it only root can create entries, so each path checked here stays what it was.
        PrepareDirectory(Path.Combine(root, BindDirectory), 0, PrivateMode);
        foreach (var peer in _options.Peers)
            PrepareDirectory(Path.Combine(root, peer.Name), _gid, DirectoryMode);
        PrepareDirectory(OwnDirectory, _gid, OwnDirectoryMode);
    }

    // An earlier version left these to the QEMU user: anything that is not a plain directory goes.
    private static void PrepareDirectory(string path, uint gid, UnixFileMode mode)
    {
        var info = new DirectoryInfo(path);
        if (info.LinkTarget is not null)
            File.Delete(path);
        else if (File.Exists(path))
            File.Delete(path);
        Directory.CreateDirectory(path);
        UnixUsers.ChangeOwner(path, 0, gid);
        UnixUsers.ChangeMode(path, mode);
    }

    /// <summary>Guests that currently have sockets.</summary>
    public IReadOnlyList<(Guid Uuid, string Name)> Guests => GuestsWhere(_ => true);

    /// <summary>
    /// Guests whose every socket still serves: its file is in place and its accept loop runs (the
    /// audit compares these with the running guests, so a guest whose loop ended is set up again).
    /// </summary>
    public IReadOnlyList<(Guid Uuid, string Name)> Serving => GuestsWhere(g => g.Serves);

    private List<(Guid Uuid, string Name)> GuestsWhere(Func<GuestSockets, bool> keep)
    {
        lock (_gate)
            return [.. _guests.Where(g => keep(g.Value)).Select(g => (g.Key, g.Value.Name))];
    }

    /// <summary>
    /// For tests: ends a guest's accept loops as an error of its listening sockets would (a Unix
    /// listener cannot be made to fail accept(2) from outside: shut down, it only answers EAGAIN).
    /// </summary>
    internal void EndAcceptingForTest(Guid uuid)
    {
        lock (_gate)
            if (_guests.TryGetValue(uuid, out var g))
                foreach (var l in g.Listeners)
                    l.Cancellation.Cancel();
    }

    /// <summary>Makes sure a running guest has its sockets (idempotent); returns false when a socket could not be set up.</summary>
    public bool Ensure(Guid uuid, string name)
    {
        if (!IsUsableName(name))
        {
            DaemonLog.SocketFailed(_logger, name, _options.RuntimeDirectory, "the guest name cannot be used in a socket path");
            return false;
        }
        lock (_gate)
        {
            // The daemon is stopping: a guest that starts now gets no sockets (and the event's
            // other work still runs, where an exception here would end the following of libvirt).
            if (_disposed)
                return false;
            if (_guests.TryGetValue(uuid, out var existing))
            {
                if (existing.Name == name && existing.Serves)
                    return true;
                existing.Dispose();
                _guests.Remove(uuid);
            }
            // One guest per name: the sockets of an earlier guest of this name (its Stopped event
            // missed) go first, or they would keep answering for it, and closing them later would
            // unlink the paths the new ones are bound to.
            foreach (var (other, earlier) in _guests.Where(g => g.Value.Name == name).ToArray())
            {
                earlier.Dispose();
                _guests.Remove(other);
            }
            var sockets = new GuestSockets(name, uuid);
            bool ok = true;
            foreach (var peer in _options.Peers)
            {
                foreach (var kind in (ReadOnlySpan<StreamKind>)[StreamKind.Mig, StreamKind.Nbd])
                {
                    var path = SocketPath(peer.Name, name, kind);
                    try
                    {
                        sockets.Listeners.Add(Listen(path, sockets, peer, kind));
                    }
                    catch (Exception e) when (e is SocketException or IOException or UnauthorizedAccessException or ArgumentException)
                    {
                        DaemonLog.SocketFailed(_logger, name, path, e.Message);
                        ok = false;
                    }
                }
            }
            _guests[uuid] = sockets;
            DaemonLog.SocketsCreated(_logger, name, sockets.Listeners.Count, _options.RuntimeDirectory);
            return ok;
        }
    }

    /// <summary>Removes a guest's sockets (it stopped or left), and any it left in the own-host directory.</summary>
    public void Remove(Guid uuid)
    {
        string? name;
        lock (_gate)
        {
            if (!_guests.Remove(uuid, out var sockets))
                return;
            sockets.Dispose();
            name = sockets.Name;
        }
        foreach (var kind in (ReadOnlySpan<StreamKind>)[StreamKind.Mig, StreamKind.Nbd])
            TryDelete(SocketPath(_options.HostName, name, kind));
        DaemonLog.SocketsRemoved(_logger, name);
    }

    /// <summary>
    /// Hands the sockets of <paramref name="name"/> to the guest <paramref name="uuid"/>, which
    /// libvirt now names so (the events of the change were missed), without closing them:
    /// libvirt may be connecting the trip's other streams to them right now.
    /// </summary>
    public void Adopt(string name, Guid uuid)
    {
        lock (_gate)
        {
            var (earlier, sockets) = _guests.FirstOrDefault(g => g.Value.Name == name);
            if (sockets is null || earlier == uuid)
                return;
            // Sockets of this UUID under another name were its old name's.
            if (_guests.Remove(uuid, out var renamed))
                renamed.Dispose();
            _guests.Remove(earlier);
            sockets.Uuid = uuid;
            _guests[uuid] = sockets;
        }
    }

    /// <summary>After (re)connecting to libvirt: sockets for exactly the running guests.</summary>
    public void Reconcile(IReadOnlyCollection<(Guid Uuid, string Name)> running)
    {
        foreach (var (uuid, _) in Guests.Where(g => !running.Any(r => r.Uuid == g.Uuid)).ToArray())
            Remove(uuid);
        foreach (var (uuid, name) in running)
            Ensure(uuid, name);
    }

    private Listener Listen(string path, GuestSockets owner, PeerOptions peer, StreamKind kind)
    {
        if (System.Text.Encoding.UTF8.GetByteCount(path) > MaxSocketPath)
            throw new ArgumentException($"socket path is longer than {MaxSocketPath} bytes");
        // Bound, owned and moded where only root can look, then renamed over whatever was at the
        // path (rename replaces a link, it never follows it): QEMU never sees a socket without
        // its final owner and mode.
        var staging = Path.Combine(_options.RuntimeDirectory, BindDirectory, Guid.NewGuid().ToString("N") + ".sock");
        var socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        try
        {
            socket.Bind(new UnixDomainSocketEndPoint(staging));
            UnixUsers.ChangeOwner(staging, 0, _gid);
            UnixUsers.ChangeMode(staging, SocketMode);
            socket.Listen(4);
            File.Move(staging, path, overwrite: true);
        }
        catch
        {
            socket.Dispose();
            TryDelete(staging);
            throw;
        }
        var listener = new Listener(path, socket);
        listener.Accepting = AcceptLoopAsync(listener, owner, peer, kind);
        return listener;
    }

    private Task AcceptLoopAsync(Listener listener, GuestSockets owner, PeerOptions peer, StreamKind kind)
    {
        var guest = owner.Name;
        return AcceptLoop.RunAsync(listener.Socket, $"socket {listener.Path}", _logger, connection =>
        {
            if (GuestQemu.Check(connection, GuestQemu.PidFile(_options.QemuPidDirectory, guest)) is { } refusal)
            {
                connection.Dispose();
                ReportRefusal(guest, listener.Path, refusal);
                return;
            }
            Guid uuid;
            lock (_gate)
                uuid = owner.Uuid;
            try
            {
                _onConnected(guest, uuid, peer, kind, connection);
            }
            catch (Exception e)
            {
                connection.Dispose();
                DaemonLog.SocketFailed(_logger, guest, listener.Path, $"cannot hand the connection on: {e.Message}");
            }
        }, listener.Cancellation.Token);
    }

    // Any member of the QEMU group can connect: one report per interval, with the count of the rest.
    private void ReportRefusal(string guest, string path, string reason)
    {
        long now = Environment.TickCount64;
        long last = Interlocked.Read(ref _lastRefusalReport);
        if (last != long.MinValue && now - last < (long)RefusalReportInterval.TotalMilliseconds
            || Interlocked.CompareExchange(ref _lastRefusalReport, now, last) != last)
        {
            Interlocked.Increment(ref _refusedSinceReport);
            return;
        }
        DaemonLog.SocketConnectionRefused(_logger, guest, path, reason, Interlocked.Exchange(ref _refusedSinceReport, 0));
    }

    internal static bool IsUsableName(string name) =>
        name.Length > 0 && name[0] != '.' && !name.Contains('/', StringComparison.Ordinal) && !name.Contains('\0', StringComparison.Ordinal);

    private static void TryDelete(string path)
    {
        try
        {
            File.Delete(path);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            // Already gone, or not ours to remove: bind then reports the real problem.
        }
    }

    /// <summary>Closes and removes every socket.</summary>
    public void Dispose()
    {
        Guid[] all;
        lock (_gate)
        {
            if (_disposed)
                return;
            // First: an Ensure from then on makes nothing that this would not remove.
            _disposed = true;
            all = [.. _guests.Keys];
        }
        foreach (var uuid in all)
            Remove(uuid);
    }

    private sealed class GuestSockets(string name, Guid uuid) : IDisposable
    {
        public string Name { get; } = name;

        /// <summary>The guest the sockets answer for (under <c>_gate</c>): <see cref="Adopt"/> may hand them to a later guest of the name.</summary>
        public Guid Uuid { get; set; } = uuid;

        public List<Listener> Listeners { get; } = [];

        public bool Serves => Listeners.All(l => l.Serves);

        public void Dispose()
        {
            foreach (var l in Listeners)
                l.Dispose();
        }
    }

    private sealed class Listener(string path, Socket socket) : IDisposable
    {
        public string Path { get; } = path;

        public Socket Socket { get; } = socket;

        public CancellationTokenSource Cancellation { get; } = new();

        /// <summary>The accept loop; it ends before the stop only on an error of the socket itself (event 36).</summary>
        public Task Accepting { get; set; } = Task.CompletedTask;

        /// <summary>QEMU can connect and be served: the file is in place and the loop runs.</summary>
        public bool Serves => File.Exists(Path) && !Accepting.IsCompleted;

        public void Dispose()
        {
            Cancellation.Cancel();
            Socket.Dispose();
            TryDelete(Path);
            Cancellation.Dispose();
        }
    }
}
