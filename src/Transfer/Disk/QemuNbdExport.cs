using System.ComponentModel;
using System.Net.Sockets;
using BFMig.Native.Linux;
using BFMig.Native.Processes;
using BFMig.Transfer.Disk.Nbd;

namespace BFMig.Transfer.Disk;

/// <summary>
/// The guest-visible content of one image, read through a read-only <c>qemu-nbd</c> export: the
/// way to read a format that maps the disk through its own tables (qcow2, with its backing chain).
/// qemu-nbd runs with the QEMU user's credentials only (setpriv: uid, gid, no supplementary
/// groups, no capabilities, no new privileges), so it opens the image and whatever backing file
/// its header names exactly as that user could: a header cannot make this root process read what
/// the QEMU user cannot. The format is given, never probed; the socket lies in a directory only
/// root and the QEMU user reach, and the connection is accepted only from this qemu-nbd (its pid,
/// SO_PEERCRED). Disposing kills and reaps the child whatever happened.
/// </summary>
public sealed class QemuNbdExport : IAsyncDisposable
{
    private const int MaxRequest = 4 << 20;

    private const int SigKill = 9;

    // Where setpriv may be (posix_spawn takes a path); qemu-nbd is found along SafePath.
    private static readonly string[] SetprivPaths = ["/usr/bin/setpriv", "/bin/setpriv"];
    private const string SafePath = "/usr/sbin:/usr/bin:/sbin:/bin";

    private readonly ChildProcess _process;
    private readonly string _directory;
    private readonly string _logPath;
    private Socket? _socket;
    private NetworkStream? _stream;
    private NbdClient? _client;

    private QemuNbdExport(ChildProcess process, string directory, string logPath)
    {
        _process = process;
        _directory = directory;
        _logPath = logPath;
    }

    /// <summary>The export's size: the disk's virtual size.</summary>
    public ulong Size => _client!.ExportSize;

    /// <summary>Process id of qemu-nbd.</summary>
    public int ProcessId => _process.Pid;

    /// <summary>
    /// Starts qemu-nbd on <paramref name="image"/> as <paramref name="qemu"/> and connects to it.
    /// Throws <see cref="IOException"/> (with qemu-nbd's own words when it exited) when it cannot
    /// be started, refuses the image or does not answer before <paramref name="ct"/> is cancelled.
    /// </summary>
    public static async Task<QemuNbdExport> StartAsync(DiskImageSpec image, NodeOwner qemu, CancellationToken ct)
    {
        string directory = PrivateDirectory(qemu);
        string socketPath = Path.Combine(directory, "q", "nbd.sock");
        string logPath = Path.Combine(directory, "qemu-nbd.log");
        string[] args = [$"--reuid={qemu.Uid}", $"--regid={qemu.Gid}", "--clear-groups", "--inh-caps=-all", "--no-new-privs", "--",
            "qemu-nbd", "--read-only", "--shared=1", $"--socket={socketPath}", "--image-opts", ImageOptions(image)];
        ChildProcess process;
        try
        {
            string setpriv = SetprivPaths.FirstOrDefault(File.Exists) ?? throw new IOException("setpriv (util-linux) is not installed");
            // qemu-nbd's words go to a file of this root-only directory, for the reason of a failure.
            using var log = new FileStream(logPath, FileMode.CreateNew, FileAccess.Write);
            int fd = (int)log.SafeFileHandle.DangerousGetHandle();
            // Nothing of this environment: no inherited socket named by systemd's LISTEN_FDS, no PATH of another's.
            process = ChildProcess.Start(setpriv, args, [(fd, 1), (fd, 2)], new Dictionary<string, string> { ["PATH"] = SafePath, ["LC_ALL"] = "C" });
        }
        catch (Exception e) when (e is Win32Exception or IOException)
        {
            Directory.Delete(directory, recursive: true);
            throw new IOException($"cannot start qemu-nbd (setpriv): {e.Message}", e);
        }
        var export = new QemuNbdExport(process, directory, logPath);
        try
        {
            await export.ConnectAsync(socketPath, ct);
            return export;
        }
        catch
        {
            await export.DisposeAsync();
            throw;
        }
    }

    // The format named, never probed. No lock: the image is lent to the incoming QEMU, which
    // holds it (unwritten until the mirror starts, after this re-hash); qemu-nbd 7.2 has no
    // --force-share, locking=off is how its options say the same.
    private static string ImageOptions(DiskImageSpec image) =>
        $"driver={image.Format},read-only=on,file.driver=file,file.filename={image.Path.Replace(",", ",,", StringComparison.Ordinal)},file.locking=off";

    /// <summary>
    /// Reads up to <paramref name="destination"/>.Length bytes at <paramref name="offset"/>: fewer
    /// past the export's end; 0 when qemu-nbd answers the read with an error (an unreadable range
    /// of a healthy connection). Throws when the connection fails.
    /// </summary>
    public async ValueTask<int> ReadAsync(long offset, Memory<byte> destination, CancellationToken ct)
    {
        if ((ulong)offset >= Size)
            return 0;
        int length = (int)Math.Min((ulong)destination.Length, Size - (ulong)offset);
        for (int done = 0; done < length;)
        {
            int n = Math.Min(MaxRequest, length - done);
            await _client!.SendRequestAsync(NbdCommand.Read, NbdCommandFlags.None, (ulong)(offset + done), (ulong)n, ReadOnlyMemory<byte>.Empty, ct);
            var (_, error) = await _client.ReadReplyAsync(destination.Slice(done, n), (ulong)(offset + done), ct);
            if (error != 0)
                return 0;
            done += n;
        }
        return length;
    }

    // A fresh directory only root can list (0711), holding one only the QEMU user and root can
    // enter (0700): qemu-nbd, running as that user, must create its socket there, and nobody else
    // may connect to it or put another in its place.
    private static string PrivateDirectory(NodeOwner qemu)
    {
        string outer = Directory.CreateTempSubdirectory("bfmig-rehash-").FullName;
        try
        {
            // Made private while the outer one is still root's alone (0700), opened to be traversed only then.
            string inner = Path.Combine(outer, "q");
            Directory.CreateDirectory(inner);
            UnixUsers.ChangeMode(inner, UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.UserExecute);
            UnixUsers.ChangeOwner(inner, qemu.Uid, qemu.Gid);
            UnixUsers.ChangeMode(outer, UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.UserExecute | UnixFileMode.GroupExecute | UnixFileMode.OtherExecute);
            return outer;
        }
        catch
        {
            Directory.Delete(outer, recursive: true);
            throw;
        }
    }

    private async Task ConnectAsync(string socketPath, CancellationToken ct)
    {
        while (true)
        {
            if (_process.Exited.IsCompleted)
                throw Exited();
            if (File.Exists(socketPath))
            {
                var socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
                try
                {
                    await socket.ConnectAsync(new UnixDomainSocketEndPoint(socketPath), ct);
                    // setpriv execs qemu-nbd: the listener must be our child itself, not whatever else the QEMU user might bind there.
                    if (UnixSockets.GetPeerCredentials(socket).Pid != _process.Pid)
                        throw new IOException($"{socketPath}: the listener is not the qemu-nbd started for the re-hash");
                    _socket = socket;
                    break;
                }
                catch (SocketException)
                {
                    socket.Dispose();
                }
                catch
                {
                    socket.Dispose();
                    throw;
                }
            }
            await Task.Delay(20, ct);
        }
        _stream = new NetworkStream(_socket, ownsSocket: true);
        try
        {
            _client = await NbdClient.ConnectAsync(_stream, new NbdClientOptions { MaxRequest = MaxRequest }, ct);
        }
        catch (Exception e) when (e is IOException or NbdProtocolException)
        {
            // qemu-nbd listens before it opens the image: a refused image shows as a reset connection, its reason on stderr.
            using var exit = CancellationTokenSource.CreateLinkedTokenSource(ct);
            exit.CancelAfter(TimeSpan.FromSeconds(2));
            try
            {
                await _process.Exited.WaitAsync(exit.Token);
            }
            catch (OperationCanceledException) when (!ct.IsCancellationRequested)
            {
                throw new IOException($"qemu-nbd's handshake failed: {e.Message}", e);
            }
            throw Exited();
        }
    }

    // qemu-nbd's exit and complaint, for the reason of a failed re-hash: a few lines at most.
    private IOException Exited()
    {
        string said;
        try
        {
            using var log = File.OpenHandle(_logPath);
            var buffer = new byte[2048];
            said = System.Text.Encoding.UTF8.GetString(buffer, 0, RandomAccess.Read(log, buffer, 0)).Trim();
        }
        catch (IOException e)
        {
            said = e.Message;
        }
        return new IOException($"qemu-nbd exited with {_process.Exited.Result}: {said}");
    }

    /// <summary>Kills qemu-nbd (SIGKILL to its pid), reaps it and removes the private directory.</summary>
    public async ValueTask DisposeAsync()
    {
        if (_client is not null)
            await _client.DisposeAsync();
        _stream?.Dispose();
        if (_stream is null)
            _socket?.Dispose();
        _process.Signal(SigKill);
        try
        {
            await _process.Exited.WaitAsync(TimeSpan.FromSeconds(10));
        }
        catch (TimeoutException)
        {
            TransferLog.Note($"bfmig-transfer: qemu-nbd (pid {_process.Pid}) did not exit within 10 s of SIGKILL");
        }
        try
        {
            Directory.Delete(_directory, recursive: true);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            TransferLog.Note($"bfmig-transfer: cannot remove {_directory}: {e.Message}");
        }
    }
}
