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
/// (<c>--migrateuri</c>, <c>--disks-uri</c>). Only the QEMU user and group (and root) can reach
/// them: directories <c>qemu_user:qemu_group 0750</c>, sockets <c>0660</c>. <c>RUNTIME/HOST/</c>
/// (this host's own name) is where the destination QEMU creates its listening sockets when a
/// guest migrates here, so it is owned by the QEMU user and left to it.
/// </summary>
public sealed class MigrationSockets : IDisposable
{
    /// <summary>Mode of the per-peer and own-host directories.</summary>
    public const UnixFileMode DirectoryMode = UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.UserExecute
        | UnixFileMode.GroupRead | UnixFileMode.GroupExecute;

    /// <summary>Mode of every socket.</summary>
    public const UnixFileMode SocketMode = UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.GroupRead | UnixFileMode.GroupWrite;

    private const int MaxSocketPath = 107;
    private readonly DaemonOptions _options;
    private readonly uint _uid;
    private readonly uint _gid;
    private readonly ILogger _logger;
    private readonly QemuConnected _onConnected;
    private readonly Lock _gate = new();
    private readonly Dictionary<Guid, GuestSockets> _guests = [];
    private bool _disposed;

    public MigrationSockets(DaemonOptions options, uint qemuUid, uint qemuGid, ILogger logger, QemuConnected onConnected)
    {
        _options = options;
        _uid = qemuUid;
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
    /// Creates the runtime directory (root:qemu_group 0750), the own-host directory and one
    /// directory per peer (qemu_user:qemu_group 0750). Throws when that is impossible.
    /// </summary>
    public void PrepareDirectories()
    {
        var root = _options.RuntimeDirectory;
        Directory.CreateDirectory(root);
        UnixUsers.ChangeOwner(root, 0, _gid);
        UnixUsers.ChangeMode(root, DirectoryMode);
        foreach (var dir in _options.Peers.Select(p => p.Name).Append(_options.HostName))
        {
            var path = Path.Combine(root, dir);
            Directory.CreateDirectory(path);
            UnixUsers.ChangeOwner(path, _uid, _gid);
            UnixUsers.ChangeMode(path, DirectoryMode);
        }
    }

    /// <summary>Guests that currently have sockets.</summary>
    public IReadOnlyList<(Guid Uuid, string Name)> Guests
    {
        get
        {
            lock (_gate)
                return [.. _guests.Select(g => (g.Key, g.Value.Name))];
        }
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
            ObjectDisposedException.ThrowIf(_disposed, this);
            if (_guests.TryGetValue(uuid, out var existing))
            {
                if (existing.Name == name && existing.Listeners.All(l => File.Exists(l.Path)))
                    return true;
                existing.Dispose();
                _guests.Remove(uuid);
            }
            var sockets = new GuestSockets(name);
            bool ok = true;
            foreach (var peer in _options.Peers)
            {
                foreach (var kind in (ReadOnlySpan<StreamKind>)[StreamKind.Mig, StreamKind.Nbd])
                {
                    var path = SocketPath(peer.Name, name, kind);
                    try
                    {
                        sockets.Listeners.Add(Listen(path, name, uuid, peer, kind));
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

    /// <summary>After (re)connecting to libvirt: sockets for exactly the running guests.</summary>
    public void Reconcile(IReadOnlyCollection<(Guid Uuid, string Name)> running)
    {
        foreach (var (uuid, _) in Guests.Where(g => !running.Any(r => r.Uuid == g.Uuid)).ToArray())
            Remove(uuid);
        foreach (var (uuid, name) in running)
            Ensure(uuid, name);
    }

    private Listener Listen(string path, string guest, Guid uuid, PeerOptions peer, StreamKind kind)
    {
        if (System.Text.Encoding.UTF8.GetByteCount(path) > MaxSocketPath)
            throw new ArgumentException($"socket path is longer than {MaxSocketPath} bytes");
        // A file left by an earlier run (or a crash) would make bind fail; nothing else lives here.
        TryDelete(path);
        var socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        try
        {
            socket.Bind(new UnixDomainSocketEndPoint(path));
            UnixUsers.ChangeOwner(path, _uid, _gid);
            UnixUsers.ChangeMode(path, SocketMode);
            socket.Listen(4);
        }
        catch
        {
            socket.Dispose();
            TryDelete(path);
            throw;
        }
        var listener = new Listener(path, socket);
        _ = AcceptLoopAsync(listener, guest, uuid, peer, kind);
        return listener;
    }

    private async Task AcceptLoopAsync(Listener listener, string guest, Guid uuid, PeerOptions peer, StreamKind kind)
    {
        while (!listener.Cancellation.IsCancellationRequested)
        {
            Socket connection;
            try
            {
                connection = await listener.Socket.AcceptAsync(listener.Cancellation.Token).ConfigureAwait(false);
            }
            catch (Exception e) when (e is OperationCanceledException or ObjectDisposedException or SocketException)
            {
                return;
            }
            try
            {
                _onConnected(guest, uuid, peer, kind, connection);
            }
            catch (Exception e)
            {
                connection.Dispose();
                DaemonLog.SocketFailed(_logger, guest, listener.Path, $"cannot hand the connection on: {e.Message}");
            }
        }
    }

    private static bool IsUsableName(string name) =>
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
            all = [.. _guests.Keys];
        }
        foreach (var uuid in all)
            Remove(uuid);
        lock (_gate)
            _disposed = true;
    }

    private sealed class GuestSockets(string name) : IDisposable
    {
        public string Name { get; } = name;

        public List<Listener> Listeners { get; } = [];

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

        public void Dispose()
        {
            Cancellation.Cancel();
            Socket.Dispose();
            TryDelete(Path);
            Cancellation.Dispose();
        }
    }
}
