using System.Diagnostics;
using System.Net.Sockets;
using BFMig.Daemon.Configuration;
using BFMig.Daemon.Logging;
using Microsoft.Extensions.Logging;

namespace BFMig.Daemon.Tests.Infrastructure;

/// <summary>
/// A real bfmigd running in this test process: its own temporary state and runtime
/// directories, a private bus, libvirt's test driver (<c>test:///default</c>, shared by every
/// connection of this process, so the tests can drive the daemon's guest "test") and the
/// transfer helper built next to the tests. The log goes to a file the tests can read.
/// </summary>
public sealed class DaemonHost : IAsyncDisposable
{
    private readonly ILoggerFactory _loggers;

    private DaemonHost(string root, DaemonOptions options, ILoggerFactory loggers, BfmigDaemon daemon, string logPath)
    {
        Root = root;
        Options = options;
        _loggers = loggers;
        Daemon = daemon;
        LogPath = logPath;
    }

    public string Root { get; }

    public DaemonOptions Options { get; }

    public BfmigDaemon Daemon { get; }

    public string LogPath { get; }

    public string Log
    {
        get
        {
            using var f = new FileStream(LogPath, FileMode.Open, FileAccess.Read, FileShare.ReadWrite);
            return new StreamReader(f).ReadToEnd();
        }
    }

    /// <summary>
    /// Writes <c>bfmig.conf</c> from <paramref name="ini"/> (with ROOT replaced by the temporary
    /// directory), loads it and starts the daemon. <paramref name="qemuMonitor"/> answers QMP in
    /// place of a QEMU, which the test driver's guests do not have.
    /// </summary>
    public static DaemonHost Start(PrivateBus bus, string ini, Func<BFMig.Native.Libvirt.LibvirtDomain, string, string>? qemuMonitor = null,
        (TimeSpan Interval, TimeSpan Confirm)? guestAudit = null)
    {
        var root = Directory.CreateTempSubdirectory("bfmigd-host-").FullName;
        // Traversable, so that the QEMU user (nobody in some tests) can reach the runtime directory inside.
        File.SetUnixFileMode(root, (UnixFileMode)0b111_101_101);
        var conf = Path.Combine(root, "bfmig.conf");
        File.WriteAllText(conf, ini.Replace("ROOT", root, StringComparison.Ordinal).Replace("BUS", bus.Address, StringComparison.Ordinal));
        WritePsk(Path.Combine(root, "psk"));
        // The test process plays the QEMU of the test driver's guest "test" on both ends of its sockets.
        Directory.CreateDirectory(Path.Combine(root, "qemu-pids"));
        WriteQemuPid(root, "test");
        var options = DaemonConfiguration.Load(DaemonConfiguration.Build(conf, [], new Dictionary<string, string?>()));
        var logPath = Path.Combine(root, "bfmigd.log");
        var writer = new StreamWriter(new FileStream(logPath, FileMode.Create, FileAccess.Write, FileShare.ReadWrite)) { AutoFlush = true };
        var loggers = DaemonLogging.Create("debug", writer, underJournal: false);
        var daemon = guestAudit is { } audit
            ? new BfmigDaemon(options, loggers, qemuMonitor: qemuMonitor) { GuestAuditInterval = audit.Interval, GuestAuditConfirm = audit.Confirm }
            : new BfmigDaemon(options, loggers, qemuMonitor: qemuMonitor);
        try
        {
            daemon.Start();
        }
        catch
        {
            daemon.StopAsync("test start failed").GetAwaiter().GetResult();
            loggers.Dispose();
            throw;
        }
        // Connected to libvirt and reconciled: the test driver's running guest "test" has its sockets.
        var deadline = DateTime.UtcNow.AddSeconds(20);
        while (daemon.Sockets?.Guests.Count is null or 0 || daemon.Libvirt?.IsConnected != true)
        {
            if (DateTime.UtcNow > deadline)
                throw new TimeoutException("the daemon did not connect to test:///default within 20 s");
            Thread.Sleep(20);
        }
        return new DaemonHost(root, options, loggers, daemon, logPath);
    }

    /// <summary>Makes this test process the QEMU of <paramref name="guest"/> too, as <see cref="Start"/> makes it that of "test".</summary>
    public void ActAsQemuOf(string guest) => WriteQemuPid(Root, guest);

    private static void WriteQemuPid(string root, string guest) =>
        File.WriteAllText(Path.Combine(root, "qemu-pids", guest + ".pid"), Environment.ProcessId.ToString(System.Globalization.CultureInfo.InvariantCulture));

    /// <summary>A minimal INI for host <paramref name="host"/> with one peer.</summary>
    public static string Ini(string host, string peer, int peerPort, string qemuUser = "root", string qemuGroup = "root", string listen = "127.0.0.1:0",
        string? adminGroup = null) => $"""
        [daemon]
        {(adminGroup is null ? "" : "admin_group = " + adminGroup)}
        host_name = {host}
        state_dir = ROOT/state
        runtime_dir = ROOT/run
        qemu_pid_dir = ROOT/qemu-pids
        libvirt_uri = test:///default
        listen = {listen}
        qemu_user = {qemuUser}
        qemu_group = {qemuGroup}
        hook_path = ROOT/hook
        bus_address = BUS
        transparent = no
        [auth]
        mode = psk
        psk_file = ROOT/psk
        [transfer]
        helper = {TestHelper}
        shutdown_grace_seconds = 5
        [peers:{peer}]
        address = 127.0.0.1:{peerPort}
        libvirt_uri = qemu+tcp://{peer}/system
        """;

    /// <summary>
    /// The helper built with these tests (not an installed /usr/libexec one, which may be another
    /// version); BFMIG_TEST_TRANSFER_HELPER picks another build (e.g. the native AOT one, to measure).
    /// </summary>
    public static string TestHelper =>
        Environment.GetEnvironmentVariable("BFMIG_TEST_TRANSFER_HELPER") is { Length: > 0 } helper
            ? helper
            : Path.Combine(AppContext.BaseDirectory, "bfmig-transfer");

    /// <summary>The same key for every test host (64 hex digits), so that two of them authenticate each other.</summary>
    public static void WritePsk(string path)
    {
        File.WriteAllText(path, "bc6dbfd8a52fc7a3ab099ad3e0baf402fe736d394204f0b211466e29ba1a5b8b\n");
        File.SetUnixFileMode(path, UnixFileMode.UserRead | UnixFileMode.UserWrite);
    }

    /// <summary>
    /// What this host's hook tells the daemon when libvirt prepares an incoming migration of
    /// <paramref name="uuid"/> (<c>migrate begin</c>): the peer port takes that guest's streams only after it.
    /// </summary>
    public void AnnounceIncoming(string guest, string uuid)
    {
        var decision = Daemon.HookEvent(guest, "migrate", "begin", "-", $"<domain><name>{guest}</name><uuid>{uuid}</uuid></domain>");
        if (!decision.Allow)
            throw new InvalidOperationException($"migrate begin refused: {decision.Message}");
    }

    public async ValueTask DisposeAsync()
    {
        await Daemon.StopAsync("test finished");
        _loggers.Dispose();
        try
        {
            Directory.Delete(Root, recursive: true);
        }
        catch (IOException)
        {
        }
    }
}

/// <summary>Command-line tools and waiting, for the tests.</summary>
public static class Tools
{
    /// <summary>Runs a program (at most 30 s) and returns its exit code and output.</summary>
    public static (int ExitCode, string Stdout, string Stderr) Run(string file, params string[] arguments)
    {
        var start = new ProcessStartInfo(file, arguments) { RedirectStandardOutput = true, RedirectStandardError = true };
        using var process = Process.Start(start) ?? throw new InvalidOperationException($"could not start {file}");
        var stdout = process.StandardOutput.ReadToEndAsync();
        var stderr = process.StandardError.ReadToEndAsync();
        if (!process.WaitForExit(TimeSpan.FromSeconds(30)))
        {
            process.Kill(entireProcessTree: true);
            throw new TimeoutException($"{file} {string.Join(' ', arguments)} did not finish in 30 s");
        }
        return (process.ExitCode, stdout.Result, stderr.Result);
    }

    /// <summary>Runs a program as uid/gid 65534 (nobody) with no supplementary groups.</summary>
    public static (int ExitCode, string Stdout, string Stderr) RunAsNobody(string file, params string[] arguments) =>
        Run("setpriv", ["--reuid=65534", "--regid=65534", "--clear-groups", file, .. arguments]);

    /// <summary>Runs a program as uid/gid 65534 (nobody) with <paramref name="gid"/> as its only supplementary group.</summary>
    public static (int ExitCode, string Stdout, string Stderr) RunAsNobodyInGroup(uint gid, string file, params string[] arguments) =>
        Run("setpriv", ["--reuid=65534", "--regid=65534", "--groups=" + gid.ToString(System.Globalization.CultureInfo.InvariantCulture), file, .. arguments]);

    /// <summary>busctl call on the daemon's object.</summary>
    public static (int ExitCode, string Stdout, string Stderr) Busctl(PrivateBus bus, string method, params string[] arguments) =>
        Run("busctl", ["--address=" + bus.Address, "call", "org.bfmig.BFMig1", "/org/bfmig/BFMig1", "org.bfmig.BFMig1.Manager", method, .. arguments]);

    /// <summary>"owner:group mode" of a path, from stat(1).</summary>
    public static string Stat(string path) => Run("stat", "-c", "%U:%G %a %F", path).Stdout.Trim();

    /// <summary>Waits until <paramref name="condition"/> holds, failing after <paramref name="seconds"/>.</summary>
    public static async Task UntilAsync(Func<bool> condition, string what, double seconds = 10)
    {
        if (!await EventuallyAsync(condition, seconds))
            Assert.Fail($"timed out after {seconds} s waiting for {what}");
    }

    /// <summary>Waits until <paramref name="condition"/> holds; false when it still does not after <paramref name="seconds"/>.</summary>
    public static async Task<bool> EventuallyAsync(Func<bool> condition, double seconds)
    {
        var deadline = DateTime.UtcNow.AddSeconds(seconds);
        while (!condition())
        {
            if (DateTime.UtcNow > deadline)
                return false;
            await Task.Delay(50);
        }
        return true;
    }

    /// <summary>The repository root (where BFMig.sln is).</summary>
    public static string RepositoryRoot()
    {
        var dir = AppContext.BaseDirectory;
        while (!File.Exists(Path.Combine(dir, "BFMig.sln")))
            dir = Path.GetDirectoryName(dir) ?? throw new InvalidOperationException("repository root not found");
        return dir;
    }
}

/// <summary>
/// A destination QEMU as <c>-incoming unix:PATH</c> would be: listens on the path, takes one
/// connection and collects everything it carries (at most 60 s).
/// </summary>
public sealed class IncomingQemu : IDisposable
{
    private readonly Socket _listener = new(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);

    public IncomingQemu(string path)
    {
        _listener.Bind(new UnixDomainSocketEndPoint(path));
        _listener.Listen(1);
        Received = Task.Run(ReceiveAllAsync);
    }

    /// <summary>The bytes of the one connection, once its sender closed it.</summary>
    public Task<byte[]> Received { get; }

    private async Task<byte[]> ReceiveAllAsync()
    {
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(60));
        using var qemu = await _listener.AcceptAsync(cts.Token);
        using var all = new MemoryStream();
        var buffer = new byte[1 << 16];
        int n;
        while ((n = await qemu.ReceiveAsync(buffer, SocketFlags.None, cts.Token)) > 0)
            all.Write(buffer, 0, n);
        return all.ToArray();
    }

    public void Dispose() => _listener.Dispose();
}
