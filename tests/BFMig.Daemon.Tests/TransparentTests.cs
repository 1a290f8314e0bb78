using System.Diagnostics;
using System.Net;
using System.Net.Sockets;
using System.Runtime.InteropServices;
using BFMig.Daemon.Configuration;
using BFMig.Daemon.Tests.Infrastructure;
using BFMig.Daemon.Transfers;
using BFMig.Daemon.Transparent;
using BFMig.Native.Linux;
using Xunit.Abstractions;

namespace BFMig.Daemon.Tests;

/// <summary>
/// Transparent mode's pieces: the kernel tables it reads, the port range, the sniffer, and the
/// redirect table itself installed in a private network namespace of a real kernel.
/// </summary>
public partial class TransparentTests(ITestOutputHelper output)
{
    /// <summary>
    /// Only a socket root made (libvirtd's, which it hands to QEMU) may find its owner on a later
    /// look; one QEMU's user made and no guest's QEMU holds is not looked for again.
    /// </summary>
    [Fact]
    public void A_connection_no_guest_holds_may_still_be_handed_over_only_if_root_made_it()
    {
        var proc = Directory.CreateTempSubdirectory("bfmig-proc-");
        try
        {
            Directory.CreateDirectory(Path.Combine(proc.FullName, "net"));
            // 198.18.0.1:40000 -> 198.18.0.2:49153 made by root; 198.18.0.1:40001 -> the same, made by the QEMU user.
            File.WriteAllLines(Path.Combine(proc.FullName, "net", "tcp"),
            [
                "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode",
                "   0: 010012C6:9C40 020012C6:C001 01 00000000:00000000 00:00000000 00000000     0        0 777 1 0",
                "   1: 010012C6:9C41 020012C6:C001 01 00000000:00000000 00:00000000 00000000 64055        0 778 1 0",
            ]);
            var qemu = new QemuProcesses(Path.Combine(proc.FullName, "pids"), proc.FullName);
            var destination = new IPEndPoint(IPAddress.Parse("198.18.0.2"), 49153);
            (Guid, string)[] guests = [(Guid.NewGuid(), "g")];
            Assert.Equal((null, true), qemu.OwnerOfConnection(new IPEndPoint(IPAddress.Parse("198.18.0.1"), 40000), destination, guests));
            Assert.Equal((null, false), qemu.OwnerOfConnection(new IPEndPoint(IPAddress.Parse("198.18.0.1"), 40001), destination, guests));
            Assert.Equal((null, false), qemu.OwnerOfConnection(new IPEndPoint(IPAddress.Parse("198.18.0.1"), 40002), destination, guests));
        }
        finally
        {
            proc.Delete(recursive: true);
        }
    }

    [Fact]
    public void Proc_net_tcp_lines_parse_to_endpoints_state_and_inode()
    {
        // Real lines: a listener on 0.0.0.0:49152 and a connection 198.18.0.1:40000 -> 198.18.0.2:49153.
        var listen = ProcNet.TryParse("   0: 00000000:C000 00000000:0000 0A 00000000:00000000 00:00000000 00000000   64055        0 123456 1 0000000000000000 100 0 0 10 0", v6: false);
        Assert.NotNull(listen);
        Assert.Equal(new IPEndPoint(IPAddress.Any, 49152), listen.Local);
        Assert.Equal(TcpSocketEntry.Listen, listen.State);
        Assert.Equal(123456UL, listen.Inode);
        Assert.Equal(64055u, listen.Uid);
        var established = ProcNet.TryParse("   1: 010012C6:9C40 020012C6:C001 01 00000000:00000000 00:00000000 00000000   64055        0 777 1 0", v6: false);
        Assert.NotNull(established);
        Assert.Equal(new IPEndPoint(IPAddress.Parse("198.18.0.1"), 40000), established.Local);
        Assert.Equal(new IPEndPoint(IPAddress.Parse("198.18.0.2"), 49153), established.Remote);
        // tcp6: a v4-mapped ::ffff:127.0.0.1 listener reads as 127.0.0.1.
        var v6 = ProcNet.TryParse("   0: 0000000000000000FFFF00000100007F:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 42 1", v6: true);
        Assert.NotNull(v6);
        Assert.Equal(new IPEndPoint(IPAddress.Loopback, 8080), v6.Local);
        Assert.Null(ProcNet.TryParse("garbage line", v6: false));
        // A wildcard listener is reached through loopback; the helper's --connect brackets IPv6.
        Assert.Equal("tcp:127.0.0.1:49152", ProcNet.ConnectArgument(ProcNet.ConnectableAddress(listen.Local)));
        Assert.Equal("tcp:[::1]:49152", ProcNet.ConnectArgument(ProcNet.ConnectableAddress(new IPEndPoint(IPAddress.IPv6Any, 49152))));
        Assert.Null(ProcNet.TryParse("   0: 0000000:C000 00000000:0000 0A 0 0 0 0 0 1", v6: false));
    }

    [Fact]
    public void This_process_is_found_holding_its_own_listener_and_no_other_socket()
    {
        using var listener = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        listener.Bind(new IPEndPoint(IPAddress.Loopback, 0));
        listener.Listen(1);
        int port = ((IPEndPoint)listener.LocalEndPoint!).Port;
        var entry = ProcNet.TcpSockets().Single(s => s.State == TcpSocketEntry.Listen && s.Local.Port == port);
        Assert.True(ProcNet.ProcessHoldsSocket(Environment.ProcessId, entry.Inode));
        Assert.False(ProcNet.ProcessHoldsSocket(Environment.ProcessId, entry.Inode + 1_000_000_007));
    }

    [Fact]
    public void A_guest_listener_is_only_one_its_own_QEMU_holds()
    {
        // The "QEMU" is this test process; libvirt's pid file says so for guest "g1" only.
        var pids = Directory.CreateTempSubdirectory("bfmig-pids");
        File.WriteAllText(Path.Combine(pids.FullName, "g1.pid"), Environment.ProcessId + "\n");
        File.WriteAllText(Path.Combine(pids.FullName, "g2.pid"), "1\n");
        using var listener = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        listener.Bind(new IPEndPoint(IPAddress.Loopback, 0));
        listener.Listen(1);
        int port = ((IPEndPoint)listener.LocalEndPoint!).Port;
        var qemu = new QemuProcesses(pids.FullName);
        Assert.Equal(new IPEndPoint(IPAddress.Loopback, port), qemu.GuestListener("g1", port));
        Assert.Null(qemu.GuestListener("g2", port)); // another process's guest
        Assert.Null(qemu.GuestListener("g3", port)); // no pid file
        Assert.Null(qemu.GuestListener("../g1", port)); // a name is never a path
        Assert.Null(qemu.GuestListener("g1", 22)); // a port the guest's QEMU does not hold (ssh, libvirtd...)
        pids.Delete(recursive: true);
    }

    [Theory]
    [InlineData(new byte[] { 0x51, 0x45, 0x56, 0x4d, 0, 0, 0, 3 }, SniffedStream.Memory)]
    [InlineData(new byte[] { 0x11, 0x22, 0x33, 0x44 }, SniffedStream.Multifd)]
    [InlineData(new byte[] { 0x16, 0x03, 0x01 }, SniffedStream.Tls)]
    [InlineData(new byte[] { 0x4e, 0x42, 0x44, 0x4d }, SniffedStream.Unknown)]
    [InlineData(new byte[] { }, SniffedStream.Closed)]
    public void First_bytes_tell_the_stream(byte[] first, SniffedStream expected) => Assert.Equal(expected, StreamSniffer.Classify(first));

    [Fact]
    public async Task A_silent_client_is_the_server_first_stream_and_nothing_is_consumed()
    {
        using var listener = LoopbackListener();
        using var silent = await LoopbackConnection.OpenAsync(listener);
        var (kind, _) = await StreamSniffer.SniffAsync(silent.Accepted, TimeSpan.FromMilliseconds(100), CancellationToken.None);
        Assert.Equal(SniffedStream.ServerFirst, kind);

        using var talker = await LoopbackConnection.OpenAsync(listener);
        await talker.Client.SendAsync(new byte[] { 0x51, 0x45, 0x56, 0x4d, 0, 0, 0, 3 });
        (kind, _) = await StreamSniffer.SniffAsync(talker.Accepted, TimeSpan.FromSeconds(5), CancellationToken.None);
        Assert.Equal(SniffedStream.Memory, kind);
        var all = new byte[8];
        Assert.Equal(8, await talker.Accepted.ReceiveAsync(all)); // the peek left every byte for the helper
        Assert.Equal(0x51, all[0]);
    }

    /// <summary>
    /// With no wait (a connection following a memory stream armed for post-copy), only bytes
    /// already there count: a silent one is told at once, one whose bytes wait is classified by
    /// them, unconsumed, and a closed one is closed.
    /// </summary>
    [Fact]
    public async Task With_no_wait_only_the_bytes_already_there_tell_the_stream()
    {
        using var listener = LoopbackListener();
        using var silent = await LoopbackConnection.OpenAsync(listener);
        Assert.Equal(SniffedStream.ServerFirst, (await StreamSniffer.SniffAsync(silent.Accepted, TimeSpan.Zero, CancellationToken.None)).Kind);

        using var talker = await LoopbackConnection.OpenAsync(listener);
        await talker.Client.SendAsync(new byte[] { 0x11, 0x22, 0x33, 0x44, 0, 0, 0, 1 });
        await Tools.UntilAsync(() => talker.Accepted.Available == 8, "the bytes to arrive", 5);
        Assert.Equal(SniffedStream.Multifd, (await StreamSniffer.SniffAsync(talker.Accepted, TimeSpan.Zero, CancellationToken.None)).Kind);
        Assert.Equal(8, talker.Accepted.Available);

        using var closer = await LoopbackConnection.OpenAsync(listener);
        closer.Client.Shutdown(SocketShutdown.Send);
        await Tools.UntilAsync(() => closer.Accepted.Poll(0, SelectMode.SelectRead), "the close to arrive", 5);
        Assert.Equal(SniffedStream.Closed, (await StreamSniffer.SniffAsync(closer.Accepted, TimeSpan.Zero, CancellationToken.None)).Kind);
    }

    private static Socket LoopbackListener()
    {
        var listener = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        listener.Bind(new IPEndPoint(IPAddress.Loopback, 0));
        listener.Listen(4);
        return listener;
    }

    // A client connected to the listener, and the listener's side of it (what the sniffer gets).
    private sealed record LoopbackConnection(Socket Client, Socket Accepted) : IDisposable
    {
        public static async Task<LoopbackConnection> OpenAsync(Socket listener)
        {
            var client = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
            await client.ConnectAsync(listener.LocalEndPoint!);
            return new LoopbackConnection(client, await listener.AcceptAsync());
        }

        public void Dispose()
        {
            Client.Dispose();
            Accepted.Dispose();
        }
    }

    /// <summary>
    /// An NBD client (QEMU's mirror) says nothing until the server speaks: the sniffer must give
    /// up at its silence deadline every time. The lab once saw it hang for good (a wait that woke
    /// with nothing queued, then a blocking peek): the migration hung instead of failing.
    /// </summary>
    [Fact]
    public async Task Sniffing_silent_connections_always_ends_at_the_silence_deadline()
    {
        using var listener = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        listener.Bind(new IPEndPoint(IPAddress.Loopback, 0));
        listener.Listen(64);
        var clients = new List<Socket>();
        var accepted = new List<Socket>();
        try
        {
            for (int i = 0; i < 32; i++)
            {
                var c = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
                clients.Add(c);
                await c.ConnectAsync(listener.LocalEndPoint!);
                accepted.Add(await listener.AcceptAsync());
            }
            for (int round = 0; round < 20; round++)
            {
                var kinds = await Task.WhenAll(accepted.Select(a => StreamSniffer.SniffAsync(a, TimeSpan.FromMilliseconds(5), CancellationToken.None)))
                    .WaitAsync(TimeSpan.FromSeconds(10));
                Assert.All(kinds, k => Assert.Equal(SniffedStream.ServerFirst, k.Kind));
            }
        }
        finally
        {
            foreach (var s in clients.Concat(accepted))
                s.Dispose();
        }
    }

    [Fact]
    public void Port_range_comes_from_qemu_conf_or_libvirts_defaults()
    {
        var dir = Directory.CreateTempSubdirectory("bfmig-qemuconf");
        var conf = Path.Combine(dir.FullName, "qemu.conf");
        Assert.Equal(MigrationPortRange.LibvirtDefault, MigrationPortRange.Read(conf));
        File.WriteAllText(conf, "# migration_port_min = 1\nmigration_port_min = 50000 # ours\n  migration_port_max=50010\n");
        Assert.Equal(new MigrationPortRange(50000, 50010), MigrationPortRange.Read(conf));
        File.WriteAllText(conf, "migration_port_min = 60000\nmigration_port_max = 50000\n");
        Assert.Contains("above migration_port_max", Assert.Throws<FormatException>(() => MigrationPortRange.Read(conf)).Message);
        File.WriteAllText(conf, "migration_port_max = \"x\"\n");
        Assert.Contains("migration_port_max", Assert.Throws<FormatException>(() => MigrationPortRange.Read(conf)).Message);
        dir.Delete(recursive: true);
    }

    [Fact]
    public void The_ruleset_matches_only_the_QEMU_user_the_peers_and_the_port_range()
    {
        var text = RedirectTable.Ruleset(64055, [IPAddress.Parse("198.18.0.2"), IPAddress.Parse("2001:db8::2")], new MigrationPortRange(49152, 49215), 16601);
        Assert.Contains("flags owner", text);
        Assert.Contains("meta mark != 0x62666d67 meta skuid { 0, 64055 } ip daddr { 198.18.0.2 } tcp dport 49152-49215 counter redirect to :16601", text);
        Assert.Contains("meta mark != 0x62666d67 meta skuid { 0, 64055 } ip6 daddr { 2001:db8::2 } tcp dport 49152-49215 counter redirect to :16601", text);
        Assert.Equal(4, text.Split('\n', StringSplitOptions.RemoveEmptyEntries).Length);
    }

    /// <summary>
    /// Configurations the redirect cannot serve keep transparent mode off (stock cost), with the
    /// reason: a peer's BFMig port inside the migration port range (root's connections to it
    /// would be taken for a migration's), and one address shared by two peers (a stream to it
    /// could be either's). Both are decided before any table is installed.
    /// </summary>
    [Fact]
    public void A_peer_port_in_the_migration_range_or_an_address_of_two_peers_keeps_transparent_mode_off()
    {
        var dir = Directory.CreateTempSubdirectory("bfmig-conf");
        try
        {
            var qemuConf = Path.Combine(dir.FullName, "qemu.conf");
            File.WriteAllText(qemuConf, "migration_port_min = 49152\nmigration_port_max = 49215\n");
            var log = new TransparentInterceptorTests.Lines();
            var conf = Path.Combine(dir.FullName, "bfmig.conf");
            File.WriteAllText(conf, $"[daemon]\nqemu_conf = {qemuConf}\n[peers:b]\naddress = 198.18.0.2:49160\n");
            var inRange = DaemonConfiguration.Load(DaemonConfiguration.Build(conf, [], new Dictionary<string, string?>()));
            using (var mode = TransparentMode.Start(inRange, 64055, new TransparentInterceptorTests.NoGuests(), log))
                Assert.Equal("off: peer b's BFMig port 49160 lies in the migration port range 49152-49215 (qemu.conf migration_port_min..max)", mode.State);
            var shared = inRange with
            {
                Peers = [new PeerOptions("b", "198.18.0.2", 16600, "qemu+tcp://198.18.0.2/system"), new PeerOptions("c", "198.18.0.2", 16600, "qemu+tcp://198.18.0.2/system")],
            };
            using (var mode = TransparentMode.Start(shared, 64055, new TransparentInterceptorTests.NoGuests(), log))
                Assert.Equal("off: no peer has an address of its own that resolves", mode.State);
            Assert.Contains(log.All, l => l.Contains("address 198.18.0.2 not redirected: it belongs to more than one peer", StringComparison.Ordinal));
        }
        finally
        {
            dir.Delete(recursive: true);
        }
    }

    [Fact]
    public void Configuration_turns_transparent_mode_on_with_peers_and_checks_migration_addresses()
    {
        var dir = Directory.CreateTempSubdirectory("bfmig-conf");
        var conf = Path.Combine(dir.FullName, "bfmig.conf");
        File.WriteAllText(conf, "[peers:b]\naddress = 198.18.0.2\nmigration_addresses = 198.18.1.2, 2001:db8::2\n");
        var options = DaemonConfiguration.Load(DaemonConfiguration.Build(conf, [], new Dictionary<string, string?>()));
        Assert.True(options.Transparent);
        Assert.Equal(["198.18.1.2", "2001:db8::2"], options.Peers[0].MigrationAddresses);
        File.WriteAllText(conf, "[daemon]\ntransparent = no\n[peers:b]\naddress = 198.18.0.2\n");
        Assert.False(DaemonConfiguration.Load(DaemonConfiguration.Build(conf, [], new Dictionary<string, string?>())).Transparent);
        File.WriteAllText(conf, "");
        Assert.False(DaemonConfiguration.Load(DaemonConfiguration.Build(conf, [], new Dictionary<string, string?>())).Transparent);
        File.WriteAllText(conf, "[peers:b]\naddress = 198.18.0.2\nmigration_addresses = hostb\n");
        var e = Assert.Throws<ConfigurationException>(() => DaemonConfiguration.Load(DaemonConfiguration.Build(conf, [], new Dictionary<string, string?>())));
        Assert.Contains("'hostb' is not an IP address", e.Message);
        dir.Delete(recursive: true);
    }

    /// <summary>
    /// The real kernel, in a network namespace private to one thread: the table redirects a
    /// matching connection to the loopback listener (SO_ORIGINAL_DST gives the real target),
    /// leaves bfmigd's own marked connections and other ports alone, and is gone once its context is closed.
    /// </summary>
    [Fact]
    public void Redirect_table_in_a_private_namespace_skips_marked_and_other_ports_and_vanishes_with_its_owner()
    {
        if (!RequireRoot())
            return;
        Exception? failure = null;
        var thread = new Thread(() =>
        {
            try
            {
                RunInPrivateNetworkNamespace();
            }
            catch (Exception e)
            {
                failure = e;
            }
        });
        thread.Start();
        thread.Join();
        if (failure is not null)
            throw new Xunit.Sdk.XunitException("in the private namespace: " + failure);
    }

    private void RunInPrivateNetworkNamespace()
    {
        const int CloneNewNet = 0x40000000;
        Assert.Equal(0, Unshare(CloneNewNet));
        var ns = $"/proc/{Environment.ProcessId}/task/{GetTid()}/ns/net";
        Run("nsenter", $"--net={ns} ip link set lo up");
        Run("nsenter", $"--net={ns} ip addr add 198.18.7.1/24 dev lo");
        var peer = IPAddress.Parse("198.18.7.1");

        using var real = Listen(new IPEndPoint(peer, 49160));
        using var redirect = Listen(new IPEndPoint(IPAddress.Loopback, 0));
        int redirectPort = ((IPEndPoint)redirect.LocalEndPoint!).Port;

        using (var table = RedirectTable.Install(12345, [peer], new MigrationPortRange(49152, 49215), redirectPort))
        {
            Assert.Contains("redirect to :" + redirectPort, Run("nsenter", $"--net={ns} nft list table inet bfmig"));
            // bfmigd's own onward connection (marked) reaches the real destination, never the redirect.
            using (var marked = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp))
            {
                marked.SetRawSocketOption(1, 36, BitConverter.GetBytes(RedirectTable.BypassMark));
                marked.Connect(new IPEndPoint(peer, 49160));
                using var a0 = real.Accept();
                Assert.False(redirect.Poll(0, SelectMode.SelectRead));
            }
            // Root's (libvirtd's) connection to the peer's migration port is redirected, and says where it was going.
            using var c = Connect(new IPEndPoint(peer, 49160));
            Assert.True(redirect.Poll(5_000_000, SelectMode.SelectRead), "the redirect listener got no connection");
            using var a = redirect.Accept();
            Assert.Equal(new IPEndPoint(peer, 49160), UnixSockets.GetOriginalDestination(a));
            // A port outside the range is not touched (libvirtd's 16509, ssh, the peer's BFMig port).
            using var outside = Listen(new IPEndPoint(peer, 16509));
            using var c2 = Connect(new IPEndPoint(peer, 16509));
            using var a2 = outside.Accept();
            Assert.False(redirect.Poll(0, SelectMode.SelectRead));
            DirectConnectionWithConnectionTrackingIsDropped(peer);
        }
        // The owner's context is gone: so is the table (nft exits 1, "No such file or directory").
        var gone = Run("nsenter", $"--net={ns} nft list tables", check: true);
        Assert.DoesNotContain("bfmig", gone);
        output.WriteLine("tables after the owner closed: '" + gone.Trim() + "'");
    }

    // With the table's connection tracking on, a connection made straight to the interceptor's
    // loopback port reports that port as its destination: it must be dropped, not carried there
    // (which would connect to the interceptor again, and again, until every slot is taken).
    private static void DirectConnectionWithConnectionTrackingIsDropped(IPAddress peer)
    {
        var log = new TransparentInterceptorTests.Lines();
        var peers = new Dictionary<IPAddress, PeerOptions> { [peer] = new PeerOptions("b", peer.ToString(), DaemonConfiguration.DefaultPort, "qemu+tcp://b/system") };
        using var interceptor = new TransparentInterceptor(0, peers, new TransparentInterceptorTests.NoGuests(), new QemuProcesses(), TimeSpan.FromMilliseconds(50), log);
        _ = interceptor.RunAsync();
        using var direct = Connect(new IPEndPoint(IPAddress.Loopback, interceptor.Port));
        direct.ReceiveTimeout = 10_000;
        Assert.Equal(0, direct.Receive(new byte[16]));
        Assert.Contains(log.All, l => l.Contains("dropped", StringComparison.Ordinal) && l.Contains("not redirected to a configured peer", StringComparison.Ordinal));
        Assert.DoesNotContain(log.All, l => l.Contains("not accelerated", StringComparison.Ordinal));
    }

    private static Socket Listen(IPEndPoint at)
    {
        var s = new Socket(at.AddressFamily, SocketType.Stream, ProtocolType.Tcp);
        s.Bind(at);
        s.Listen(4);
        return s;
    }

    private static Socket Connect(IPEndPoint to)
    {
        var s = new Socket(to.AddressFamily, SocketType.Stream, ProtocolType.Tcp);
        s.Connect(to);
        return s;
    }

    private static string Run(string file, string args, bool check = true)
    {
        using var p = Process.Start(new ProcessStartInfo(file, args) { RedirectStandardOutput = true, RedirectStandardError = true })!;
        var stdout = p.StandardOutput.ReadToEnd();
        var stderr = p.StandardError.ReadToEnd();
        p.WaitForExit();
        if (check && p.ExitCode != 0)
            throw new InvalidOperationException($"{file} {args}: exit {p.ExitCode}: {stderr}");
        return stdout;
    }

    private bool RequireRoot()
    {
        if (Geteuid() == 0)
            return true;
        if (string.Equals(Environment.GetEnvironmentVariable("CI"), "true", StringComparison.OrdinalIgnoreCase))
            Assert.Fail("prerequisite missing (CI=true, so this fails): root, for a private network namespace");
        output.WriteLine("SKIPPED: needs root (a private network namespace)");
        return false;
    }

    [LibraryImport("libc", EntryPoint = "unshare", SetLastError = true)]
    private static partial int Unshare(int flags);

    [LibraryImport("libc", EntryPoint = "gettid")]
    private static partial int GetTid();

    [LibraryImport("libc", EntryPoint = "geteuid")]
    private static partial int Geteuid();
}

/// <summary>The loopback port as any local user sees it: a direct connection carries nothing and floods no log.</summary>
public class TransparentInterceptorTests
{
    internal sealed class Lines : Microsoft.Extensions.Logging.ILogger
    {
        public readonly System.Collections.Concurrent.ConcurrentQueue<string> All = new();
        public IDisposable? BeginScope<TState>(TState state) where TState : notnull => null;
        public bool IsEnabled(Microsoft.Extensions.Logging.LogLevel logLevel) => true;
        public void Log<TState>(Microsoft.Extensions.Logging.LogLevel logLevel, Microsoft.Extensions.Logging.EventId eventId, TState state,
            Exception? exception, Func<TState, Exception?, string> formatter) => All.Enqueue(formatter(state, exception));
    }

    internal sealed class NoGuests : ITransparentHost
    {
        public IReadOnlyCollection<(Guid Uuid, string Name)> RunningGuests() => [];
        public OutgoingMemory? MemoryGoingTo(string peer, ushort targetPort) => null;
        public bool StartSend(string guest, Guid uuid, PeerOptions peer, BFMig.Transfer.Wire.StreamKind kind, Socket qemu, ushort targetPort) =>
            throw new InvalidOperationException("nothing may be accelerated here");
        public IDisposable Carried(Guid uuid, string stream, string why) => throw new InvalidOperationException("no guest's stream is here");
    }

    [Fact]
    public async Task Direct_connections_to_the_loopback_port_are_dropped_with_a_bounded_log()
    {
        var log = new Lines();
        using var interceptor = new TransparentInterceptor(0, new Dictionary<IPAddress, PeerOptions>(), new NoGuests(), new QemuProcesses(),
            TimeSpan.FromMilliseconds(50), log);
        _ = interceptor.RunAsync();
        for (int i = 0; i < 30; i++)
        {
            using var c = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
            await c.ConnectAsync(new IPEndPoint(IPAddress.Loopback, interceptor.Port));
            // Not redirected by the table: no original destination, so the connection is closed unanswered.
            Assert.Equal(0, await c.ReceiveAsync(new byte[16]).WaitAsync(TimeSpan.FromSeconds(10)));
        }
        // Without connection tracking (no redirect table here) SO_ORIGINAL_DST fails; with it, the destination is this port, no peer's.
        var dropped = log.All.Count(l => l.Contains("dropped", StringComparison.Ordinal)
            && (l.Contains("SO_ORIGINAL_DST", StringComparison.Ordinal) || l.Contains("not redirected to a configured peer", StringComparison.Ordinal)));
        Assert.InRange(dropped, 1, 10);
    }
}
