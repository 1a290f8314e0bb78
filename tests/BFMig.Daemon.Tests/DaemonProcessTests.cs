using System.Diagnostics;
using System.Net.Sockets;
using BFMig.Daemon.Tests.Infrastructure;
using BFMig.Tests.Shared;
using Tmds.DBus.Protocol;
using Xunit.Abstractions;

namespace BFMig.Daemon.Tests;

/// <summary>
/// The built <c>bfmigd</c> executable as systemd would run it (configuration errors, SIGTERM),
/// and the in-process daemon's limits on transfers, with a stand-in helper that only holds its
/// stream open (the real helper is exercised in <see cref="DataPathTests"/>).
/// </summary>
public sealed class DaemonProcessTests(ITestOutputHelper output) : IDisposable
{
    private readonly string _dir = CreateDirectory();

    private static string CreateDirectory()
    {
        var dir = Directory.CreateTempSubdirectory("bfmigd-proc-").FullName;
        File.SetUnixFileMode(dir, (UnixFileMode)0b111_101_101);
        return dir;
    }

    public void Dispose()
    {
        try
        {
            Directory.Delete(_dir, recursive: true);
        }
        catch (IOException)
        {
        }
    }

    private static string Bfmigd => Path.Combine(AppContext.BaseDirectory, "bfmigd");

    private string WriteConf(string text)
    {
        var path = Path.Combine(_dir, "bfmig.conf");
        File.WriteAllText(path, text.Replace("ROOT", _dir, StringComparison.Ordinal));
        return path;
    }

    /// <summary>bfmig.conf for host "hosta" (one peer, "hostb") on <paramref name="bus"/>, with its PSK file.</summary>
    private string WriteDaemonConf(PrivateBus bus)
    {
        DaemonHost.WritePsk(Path.Combine(_dir, "psk"));
        return WriteConf(DaemonHost.Ini("hosta", "hostb", 9).Replace("BUS", bus.Address, StringComparison.Ordinal));
    }

    [Theory]
    [InlineData("[daemon]\nlisten = 127.0.0.1:99999\n", "daemon:listen = '127.0.0.1:99999'")]
    [InlineData("[daemon]\nqemu_user = no-such-user-here\nstate_dir = ROOT/s\nruntime_dir = ROOT/r\n", "daemon:qemu_user = 'no-such-user-here': no such user")]
    [InlineData("[auth]\nmode = psk\npsk_file = ROOT/absent\n[daemon]\nqemu_user = root\nqemu_group = root\nstate_dir = ROOT/s\nruntime_dir = ROOT/r\n", "auth:psk_file = '")]
    [InlineData("[daemon]\nhost_name = a\nqemu_user = root\nqemu_group = root\n[peers:a]\naddress = 127.0.0.1\n", "[peers:a] has this host's own name")]
    public void A_configuration_error_exits_2_naming_the_key(string conf, string expected)
    {
        var (code, _, stderr) = Tools.Run(Bfmigd, "--config", WriteConf(conf));
        Assert.Equal(2, code);
        Assert.Contains(expected, stderr);
    }

    [Fact]
    public void A_missing_config_file_and_a_bad_command_line_value_exit_2()
    {
        var (code, _, stderr) = Tools.Run(Bfmigd, "--config", Path.Combine(_dir, "absent.conf"));
        Assert.Equal(2, code);
        Assert.Contains("absent.conf does not exist", stderr);
        (code, _, stderr) = Tools.Run(Bfmigd, "--config", WriteConf(""), "--log-level", "chatty");
        Assert.Equal(2, code);
        Assert.Contains("daemon:log_level = 'chatty' on the command line", stderr);
    }

    [Fact]
    public async Task The_executable_serves_the_bus_and_stops_cleanly_on_SIGTERM()
    {
        using var bus = new PrivateBus();
        var conf = WriteDaemonConf(bus);
        // systemd's side of Type=notify: a datagram socket named by NOTIFY_SOCKET.
        var notifyPath = Path.Combine(_dir, "notify");
        using var notify = new Socket(AddressFamily.Unix, SocketType.Dgram, ProtocolType.Unspecified);
        notify.Bind(new UnixDomainSocketEndPoint(notifyPath));
        var messages = new List<string>();
        var collecting = Task.Run(async () =>
        {
            var buffer = new byte[4096];
            using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(60));
            try
            {
                while (true)
                {
                    var n = await notify.ReceiveAsync(buffer, SocketFlags.None, cts.Token);
                    lock (messages)
                        messages.Add(System.Text.Encoding.UTF8.GetString(buffer, 0, n));
                }
            }
            catch (Exception e) when (e is OperationCanceledException or SocketException or ObjectDisposedException)
            {
            }
        });
        bool Notified(string text)
        {
            lock (messages)
                return messages.Any(m => m.Contains(text, StringComparison.Ordinal));
        }
        await using var daemon = new BfmigdProcess(Bfmigd, conf, ("NOTIFY_SOCKET", notifyPath));
        try
        {
            // Its own test driver has the guest "test" running: sockets appear once it is ready.
            var socket = Path.Combine(_dir, "run", "hostb", "test.mig");
            await Tools.UntilAsync(() => File.Exists(socket), "the daemon's socket for guest test", 30);
            var (code, status, err) = Tools.Busctl(bus, "GetStatus");
            Assert.True(code == 0, err);
            Assert.Contains("\"hosta\"", status);
            await Tools.UntilAsync(() => Notified("READY=1"), "READY=1 on NOTIFY_SOCKET");
            Assert.True(Notified("STATUS=host hosta, 1 peers, data port "));

            // systemctl reload sends SIGHUP: the daemon stays.
            Assert.Equal(0, Tools.Run("kill", "-HUP", daemon.Pid).ExitCode);
            Assert.False(daemon.Process.WaitForExit(1000), "SIGHUP must not stop bfmigd");
            Assert.Equal(0, Tools.Busctl(bus, "GetStatus").ExitCode);
            // The runtime runs the handler on a thread-pool thread: the line can come a moment later,
            // and SIGTERM sent before it would race the logger's end.
            await Tools.UntilAsync(() => daemon.Line("SIGHUP: settings are read at start only") is not null, "the SIGHUP log line", 30);

            Assert.Equal(0, Tools.Run("kill", "-TERM", daemon.Pid).ExitCode);
            Assert.True(daemon.Process.WaitForExit(20_000), "bfmigd did not stop within 20 s of SIGTERM");
            Assert.Equal(0, daemon.Process.ExitCode);
            Assert.False(File.Exists(socket), "the sockets are removed on stop");
            var log = await daemon.OutputAsync();
            Assert.Contains("stopping: SIGTERM", log);
            Assert.Contains("SIGHUP: settings are read at start only", log);
            Assert.True(Notified("STOPPING=1"), "STOPPING=1 on NOTIFY_SOCKET");
            Assert.Contains("stopped", log);
        }
        finally
        {
            output.WriteLine(await daemon.StopAsync());
        }
    }

    [Fact]
    public void A_daemon_that_cannot_load_libvirt_stops_and_says_why_instead_of_running_blind()
    {
        // A real unloadable library: in a mount namespace of its own, libvirt's shared object is
        // /dev/null (as after a broken upgrade). The daemon starts (libvirt is loaded lazily), but its
        // watcher cannot follow a guest: it must stop with exit 1 and name the cause, not keep its
        // bus name and listeners while no guest ever gets a socket.
        using var bus = new PrivateBus();
        var conf = WriteDaemonConf(bus);
        // The file the loader would open (ldconfig's cache names it; the link's target is the file).
        var cached = Tools.Run("ldconfig", "-p").Stdout.Split('\n')
            .Select(l => l.Trim()).First(l => l.StartsWith("libvirt.so.0 ", StringComparison.Ordinal));
        var library = Tools.Run("readlink", "-f", cached[(cached.IndexOf("=> ", StringComparison.Ordinal) + 3)..]).Stdout.Trim();
        Assert.True(File.Exists(library), $"libvirt.so.0 not found ({library})");
        var (code, stdout, stderr) = Tools.Run("unshare", "--mount", "sh", "-c",
            "mount --bind /dev/null \"$1\" && exec env --default-signal=HUP \"$2\" --config \"$3\"", "sh", library, Bfmigd, conf);
        output.WriteLine(stdout + stderr);
        Assert.Equal(1, code);
        // The reason names what could not be loaded (on the line of event 8 itself).
        var failure = stdout.Split('\n').First(l => l.Contains("the libvirt watcher failed: ", StringComparison.Ordinal));
        Assert.Contains("libvirt.so.0", failure[failure.IndexOf("failed: ", StringComparison.Ordinal)..], StringComparison.Ordinal);
        Assert.Contains("stopping: the libvirt watcher failed", stdout);
        Assert.Contains("stopped", stdout);
    }

    [Fact]
    public async Task The_peer_port_outlives_running_out_of_descriptors()
    {
        // EMFILE on accept (a connection flood, a leak elsewhere) used to end the accept loop
        // silently: the port stayed bound, nothing answered, the daemon went on. A real bfmigd whose
        // descriptor limit is lowered under it must say so and serve the port again once it can.
        using var bus = new PrivateBus();
        var conf = WriteDaemonConf(bus);
        await using var daemon = new BfmigdProcess(Bfmigd, conf);
        try
        {
            // Settled first: libvirt loaded and followed (its guest's socket), so that nothing but the
            // accept below needs a new descriptor once the limit is down.
            await Tools.UntilAsync(() => File.Exists(Path.Combine(_dir, "run", "hostb", "test.mig")), "the daemon's socket for guest test", 30);
            var listening = daemon.Line("accepting peer connections on 127.0.0.1:")!;
            var port = int.Parse(listening[(listening.LastIndexOf(':') + 1)..].Trim(), System.Globalization.CultureInfo.InvariantCulture);

            // The soft limit at the lowest free descriptor number: no new descriptor can be opened. A
            // descriptor closed meanwhile would leave a free number below it: lowered again until none.
            var soft = Tools.Run("prlimit", "--pid", daemon.Pid, "--nofile", "--output=SOFT", "--noheadings").Stdout.Trim();
            int LowestFree()
            {
                var open = Directory.GetFiles($"/proc/{daemon.Pid}/fd").Select(f => int.Parse(Path.GetFileName(f), System.Globalization.CultureInfo.InvariantCulture)).ToHashSet();
                return Enumerable.Range(0, int.MaxValue).First(n => !open.Contains(n));
            }
            for (int limit = -1, free = LowestFree(); free != limit; free = LowestFree())
            {
                Assert.Equal(0, Tools.Run("prlimit", "--pid", daemon.Pid, $"--nofile={free}:").ExitCode);
                limit = free;
            }
            using var first = new TcpClient();
            await first.ConnectAsync(System.Net.IPAddress.Loopback, port); // the kernel's backlog takes it
            await Tools.UntilAsync(() => daemon.Line("accepting on the peer port") is not null, "the accept failure to be reported", 20);
            Assert.Matches("failed: Too many open files[^;]*; retrying in ", daemon.Line("accepting on the peer port")!);
            Assert.False(daemon.Process.HasExited, "bfmigd ended when it ran out of descriptors");

            // Descriptors again: the connection waiting in the backlog is served (refused as no peer's).
            Assert.Equal(0, Tools.Run("prlimit", "--pid", daemon.Pid, $"--nofile={soft}:").ExitCode);
            await first.GetStream().WriteAsync(new byte[64]);
            await Tools.UntilAsync(() => daemon.Line("rejected peer connection from 127.0.0.1:") is not null, "the waiting connection to be served", 20);
            Assert.Null(daemon.Line("failed: it ended on its own"));
        }
        finally
        {
            output.WriteLine(await daemon.StopAsync());
        }
    }

    [Fact]
    public async Task Transfers_are_bounded_and_killed_after_the_grace_time_on_stop()
    {
        using var bus = new PrivateBus();
        // Stand-in helper: holds the stream (fd 3) open and never finishes on its own.
        var helper = Path.Combine(_dir, "fake-transfer");
        File.WriteAllText(helper, "#!/bin/sh\nexec sleep 120\n");
        File.SetUnixFileMode(helper, (UnixFileMode)0b111_101_101);
        var ini = DaemonHost.Ini("hosta", "hostb", 9).Replace($"helper = {DaemonHost.TestHelper}\nshutdown_grace_seconds = 5",
            $"shutdown_grace_seconds = 1\nmax_concurrent = 1\nhelper = {helper}", StringComparison.Ordinal);
        Assert.Contains(helper, ini);
        var host = DaemonHost.Start(bus, ini);
        try
        {
            var finished = new TaskCompletionSource<(bool Ok, string Message)>(TaskCreationOptions.RunContinuationsAsynchronously);
            using var watcher = TestBus.Open(bus.Address);
            using var subscription = watcher.WatchManager("TransferFinished", static (m, _) =>
            {
                var r = m.GetBodyReader();
                r.ReadString();
                r.ReadString();
                return (r.ReadBool(), r.ReadString());
            }, f => finished.TrySetResult(f));
    
            var mig = Path.Combine(host.Options.RuntimeDirectory, "hostb", "test.mig");
            var nbd = Path.Combine(host.Options.RuntimeDirectory, "hostb", "test.nbd");
            await Tools.UntilAsync(() => File.Exists(mig), "sockets of guest test");
            using var first = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
            await first.ConnectAsync(new UnixDomainSocketEndPoint(mig));
            await Tools.UntilAsync(() => host.Daemon.Transfers!.Active == 1, "the first transfer to start");
            Assert.True(host.Daemon.Transfers!.IsBusy(Guid.Parse("6695eb01-f6a4-8304-79aa-97f2502e193f")));

            // The second stream exceeds transfer:max_concurrent = 1: closed at once (QEMU would fail the migration).
            using var second = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
            await second.ConnectAsync(new UnixDomainSocketEndPoint(nbd));
            using (var cts = new CancellationTokenSource(TimeSpan.FromSeconds(10)))
                Assert.Equal(0, await second.ReceiveAsync(new byte[16], SocketFlags.None, cts.Token));
            Assert.Contains("transfer:max_concurrent = 1", host.Log);

            var clock = Stopwatch.StartNew();
            await host.Daemon.StopAsync("test").WaitAsync(TimeSpan.FromSeconds(30));
            Assert.InRange(clock.Elapsed.TotalSeconds, 0.9, 15);
            var (ok, message) = await finished.Task.WaitAsync(TimeSpan.FromSeconds(10));
            Assert.False(ok);
            Assert.Contains("memory: failed (exit 143)", message);
            Assert.Contains("killing 1 transfers still running after 1 s", host.Log);
        }
        finally
        {
            await host.DisposeAsync();
        }
    }

    [Fact]
    public async Task Socket_directories_belong_to_root_and_only_the_guests_own_QEMU_gets_a_transfer()
    {
        using var bus = new PrivateBus();
        var host = DaemonHost.Start(bus, DaemonHost.Ini("hosta", "hostb", 9, qemuUser: "nobody", qemuGroup: "nogroup"));
        try
        {
            var run = host.Options.RuntimeDirectory;
            var mig = Path.Combine(run, "hostb", "test.mig");
            await Tools.UntilAsync(() => File.Exists(mig), "sockets of guest test");
            Assert.Equal("root:nogroup 750 directory", Tools.Stat(run));
            // Before: nobody:nogroup 750, so the QEMU user could swap a socket for a link that root then chowned.
            Assert.Equal("root:nogroup 750 directory", Tools.Stat(Path.Combine(run, "hostb")));
            Assert.Equal("root:nogroup 1770 directory", Tools.Stat(Path.Combine(run, "hosta")));
            Assert.Equal("root:root 700 directory", Tools.Stat(Path.Combine(run, ".bind")));
            Assert.Equal("root:nogroup 660 socket", Tools.Stat(mig));
            Assert.Equal("root:nogroup 660 socket", Tools.Stat(Path.Combine(run, "hostb", "test.nbd")));

            // The QEMU user can neither replace nor remove a socket root made.
            var swap = Tools.RunAsNobody("/usr/bin/python3", "-c", "import os,sys; os.unlink(sys.argv[1])", mig);
            Assert.NotEqual(0, swap.ExitCode);
            Assert.Contains("Permission denied", swap.Stderr);
            Assert.Equal("root:nogroup 660 socket", Tools.Stat(mig));

            // The QEMU group reaches the socket, but a process that is not the guest's QEMU (its pid
            // is not in libvirt's pid file) is hung up on before any helper starts.
            const string connect = "import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.settimeout(10); sys.exit(0 if s.recv(1) == b'' else 3)";
            var asQemuUser = Tools.RunAsNobody("/usr/bin/python3", "-c", connect, mig);
            Assert.True(asQemuUser.ExitCode == 0, "the QEMU group must reach the socket and be hung up on: " + asQemuUser.Stderr);
            await Tools.UntilAsync(() => host.Log.Contains("is not the guest's QEMU", StringComparison.Ordinal), "the refusal in the log");
            Assert.Contains($"connection to {mig} refused: process ", host.Log);
            Assert.DoesNotContain("started (pid", host.Log);
            var asOther = Tools.Run("setpriv", "--reuid=1", "--regid=1", "--clear-groups", "/usr/bin/python3", "-c", connect, mig);
            Assert.NotEqual(0, asOther.ExitCode);
            Assert.Contains("Permission denied", asOther.Stderr);
            // The QEMU user may create its own listening socket in this host's directory (destination side).
            var own = Tools.RunAsNobody("/usr/bin/python3", "-c", "import socket,sys; s=socket.socket(socket.AF_UNIX); s.bind(sys.argv[1])", Path.Combine(run, "hosta", "test.mig"));
            Assert.True(own.ExitCode == 0, own.Stderr);
        }
        finally
        {
            await host.DisposeAsync();
        }
    }

    /// <summary>
    /// The built bfmigd started as systemd starts a service, with every signal at its default
    /// action: a launcher that ignores SIGHUP (nohup, some CI runners) passes that on, and .NET
    /// leaves an inherited ignored signal ignored, so no handler would run (the "flake" of earlier
    /// hand-run CIs). Its log lines are collected as they come.
    /// </summary>
    private sealed class BfmigdProcess : IAsyncDisposable
    {
        private readonly List<string> _lines = [];
        private readonly Task _stdout;
        private readonly Task<string> _stderr;

        public BfmigdProcess(string bfmigd, string conf, params (string Name, string Value)[] environment)
        {
            var start = new ProcessStartInfo("env", ["--default-signal=HUP", bfmigd, "--config", conf]) { RedirectStandardOutput = true, RedirectStandardError = true };
            foreach (var (name, value) in environment)
                start.Environment[name] = value;
            Process = Process.Start(start)!;
            _stdout = Task.Run(async () =>
            {
                while (await Process.StandardOutput.ReadLineAsync() is { } line)
                    lock (_lines)
                        _lines.Add(line);
            });
            _stderr = Process.StandardError.ReadToEndAsync();
        }

        public Process Process { get; }

        public string Pid => Process.Id.ToString(System.Globalization.CultureInfo.InvariantCulture);

        /// <summary>The first log line so far that contains <paramref name="text"/>.</summary>
        public string? Line(string text)
        {
            lock (_lines)
                return _lines.FirstOrDefault(l => l.Contains(text, StringComparison.Ordinal));
        }

        /// <summary>Everything it wrote (after it exited).</summary>
        public async Task<string> OutputAsync()
        {
            await _stdout;
            var errors = await _stderr;
            lock (_lines)
                return string.Join('\n', _lines) + errors;
        }

        /// <summary>Kills it if it still runs; returns everything it wrote.</summary>
        public async Task<string> StopAsync()
        {
            if (!Process.HasExited)
                Process.Kill();
            await Process.WaitForExitAsync();
            return await OutputAsync();
        }

        public async ValueTask DisposeAsync()
        {
            await StopAsync();
            Process.Dispose();
        }
    }
}
