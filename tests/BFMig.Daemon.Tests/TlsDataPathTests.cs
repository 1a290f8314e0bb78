using System.Collections.Concurrent;
using System.Diagnostics;
using System.Net.Sockets;
using BFMig.Daemon.Tests.Infrastructure;
using BFMig.Tests.Shared;
using Tmds.DBus.Protocol;
using Xunit.Abstractions;

namespace BFMig.Daemon.Tests;

/// <summary>
/// Two daemons in <c>auth:mode = tls</c> with libvirt-style host certificates (server and
/// client certificate and key per host, one CA; made by openssl for the test) carry a real QEMU
/// 7.2 migration stream through two bfmig-transfer helpers over mutual TLS. The source feeds the
/// stream slowly, so the helpers' live progress reaches the bus as several TransferProgress
/// signals before TransferFinished.
/// </summary>
public sealed class TlsDataPathTests(ITestOutputHelper output) : IAsyncLifetime
{
    private readonly PrivateBus _busA = new();
    private readonly PrivateBus _busB = new();
    private TestCertificates? _certs;
    private DaemonHost? _a;
    private DaemonHost? _b;

    private string TlsIni(string host, string peer, int peerPort)
    {
        var server = _certs!.Issue(host + "-server", host, [host, "localhost"], ["127.0.0.1"]);
        var client = _certs.Issue(host + "-client", host, [host], []);
        return DaemonHost.Ini(host, peer, peerPort).Replace("mode = psk\npsk_file = ROOT/psk\n", $"""
                mode = tls
                tls_cert = {server.Cert}
                tls_key = {server.Key}
                tls_client_cert = {client.Cert}
                tls_client_key = {client.Key}
                tls_ca = {_certs.Ca}

                """, StringComparison.Ordinal);
    }

    public Task InitializeAsync()
    {
        if (!TestCertificates.Available)
            return Task.CompletedTask;
        _certs = TestCertificates.Create();
        _b = DaemonHost.Start(_busB, TlsIni("hostb", "hosta", 9));
        _a = DaemonHost.Start(_busA, TlsIni("hosta", "hostb", _b.Daemon.PeerPort));
        return Task.CompletedTask;
    }

    public async Task DisposeAsync()
    {
        try
        {
            foreach (var (name, host) in new[] { ("A", _a), ("B", _b) })
            {
                if (host is null)
                    continue;
                output.WriteLine($"---- {name} ----\n" + host.Log);
                await host.DisposeAsync();
            }
        }
        finally
        {
            _busA.Dispose();
            _busB.Dispose();
            _certs?.Dispose();
        }
    }

    [Fact]
    public async Task A_real_QEMU_stream_crosses_mutual_TLS_and_its_progress_is_signalled_while_it_runs()
    {
        if (_a is null || _b is null)
        {
            Assert.False(string.Equals(Environment.GetEnvironmentVariable("CI"), "true", StringComparison.OrdinalIgnoreCase), "openssl is required (CI=true)");
            output.WriteLine("skipped: openssl not installed");
            return;
        }
        Assert.Equal((Configuration.PeerAuthMode.Tls, Configuration.PeerAuthMode.Tls), (_a.Options.AuthMode, _b.Options.AuthMode));
        var stream = StreamFixtures.Load("q72-pc-paused.bin.zst");
        var finished = new TaskCompletionSource<(bool Ok, string Message)>(TaskCreationOptions.RunContinuationsAsynchronously);
        var progress = new ConcurrentQueue<(string Guest, string Peer, string Stream, ulong Sent, ulong Saved)>();
        int progressBeforeFinished = -1;
        using var watcher = TestBus.Open(_busA.Address);
        using var onProgress = watcher.WatchManager("TransferProgress", static (m, _) =>
        {
            var r = m.GetBodyReader();
            return (r.ReadString(), r.ReadString(), r.ReadString(), r.ReadUInt64(), r.ReadUInt64());
        }, progress.Enqueue);
        using var onFinished = watcher.WatchManager("TransferFinished", static (m, _) =>
        {
            var r = m.GetBodyReader();
            r.ReadString();
            r.ReadString();
            return (r.ReadBool(), r.ReadString());
        }, f =>
        {
            progressBeforeFinished = progress.Count;
            finished.TrySetResult(f);
        });

        _b.AnnounceIncoming("test", "6695eb01-f6a4-8304-79aa-97f2502e193f");
        var destinationPath = Path.Combine(_b.Options.RuntimeDirectory, "hostb", "test.mig");
        using var destination = new IncomingQemu(destinationPath);

        var sourcePath = Path.Combine(_a.Options.RuntimeDirectory, "hostb", "test.mig");
        await Tools.UntilAsync(() => File.Exists(sourcePath), "A's socket for guest test");
        var clock = Stopwatch.StartNew();
        using (var source = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified))
        {
            await source.ConnectAsync(new UnixDomainSocketEndPoint(sourcePath));
            // About 2.5 s of stream: the helper reports every half second.
            int chunk = stream.Length / 16 + 1;
            for (int at = 0; at < stream.Length; at += chunk)
            {
                await source.SendAsync(stream.AsMemory(at, Math.Min(chunk, stream.Length - at)), SocketFlags.None);
                await Task.Delay(160);
            }
            source.Shutdown(SocketShutdown.Send);
            using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(60));
            while (await source.ReceiveAsync(new byte[4096], SocketFlags.None, cts.Token) > 0)
            {
            }
        }
        var arrived = await destination.Received.WaitAsync(TimeSpan.FromSeconds(60));
        Assert.True(stream.AsSpan().SequenceEqual(arrived), $"the destination got {arrived.Length} bytes, not the {stream.Length} the source sent");

        var (ok, message) = await finished.Task.WaitAsync(TimeSpan.FromSeconds(30));
        Assert.True(ok, message);
        var signals = progress.ToArray();
        output.WriteLine($"{signals.Length} progress signals in {clock.Elapsed.TotalSeconds:F1} s: " + string.Join(", ", signals.Select(p => $"{p.Stream} {p.Sent}/{p.Saved}")));
        Assert.All(signals, p => Assert.Equal(("test", "hostb", "memory"), (p.Guest, p.Peer, p.Stream)));
        Assert.True(signals.Length >= 3, $"only {signals.Length} progress signals for a stream of {clock.Elapsed.TotalSeconds:F1} s");
        Assert.Equal(signals.Length, progressBeforeFinished);
        for (int i = 1; i < signals.Length; i++)
            Assert.True(signals[i].Sent + signals[i].Saved >= signals[i - 1].Sent + signals[i - 1].Saved, "progress went backwards");
        var last = signals[^1];
        // Sent + saved is what QEMU wrote into the helper (the whole stream), or the wire bytes when framing cost more than it saved.
        Assert.InRange(last.Sent + last.Saved, (ulong)stream.Length, (ulong)stream.Length * 11 / 10);
        Assert.True(last.Sent > 0);
    }

    [Fact]
    public async Task Without_the_host_certificates_the_daemon_runs_but_refuses_migrations_saying_which_file_is_missing()
    {
        using var bus = new PrivateBus();
        var ini = DaemonHost.Ini("hosta", "hostb", 9).Replace("mode = psk\npsk_file = ROOT/psk\n",
            "mode = tls\ntls_cert = ROOT/absent-cert.pem\ntls_key = ROOT/absent-key.pem\ntls_ca = ROOT/absent-ca.pem\n", StringComparison.Ordinal);
        await using var host = DaemonHost.Start(bus, ini);
        Assert.Equal(Configuration.PeerAuthMode.Tls, host.Options.AuthMode);
        Assert.Equal(0, host.Daemon.PeerPort);
        var e = Assert.Throws<Api.DaemonApiException>(() => host.Daemon.PrepareMigration("test", "hostb"));
        Assert.Contains("data path is off: auth:tls_cert = '", e.Message);
        Assert.Contains("absent-cert.pem' does not exist", e.Message);
        Assert.Contains("the data path is off", host.Log);
        var auth = host.Daemon.Doctor().Single(c => c.Name == "auth");
        Assert.False(auth.Passed);
        Assert.Contains("absent-cert.pem", auth.Detail);
    }

    /// <summary>
    /// Checkpoints in the default <c>auth:mode = tls</c> (issue 15): the source daemon's exchange
    /// goes through the destination's peer port as a route frame plus mutual TLS, with the
    /// credentials the helpers use, and is stored for the arrival; a client certificate of the same
    /// CA that does not name the peer it claims to be is refused before anything is stored.
    /// </summary>
    [Fact]
    public async Task Checkpoints_cross_mutual_TLS_and_a_sender_whose_certificate_names_another_host_is_refused()
    {
        if (_a is null || _b is null)
        {
            Assert.False(string.Equals(Environment.GetEnvironmentVariable("CI"), "true", StringComparison.OrdinalIgnoreCase), "openssl is required (CI=true)");
            output.WriteLine("skipped: openssl not installed");
            return;
        }
        const string uuid = "6695eb01-f6a4-8304-79aa-97f2502e193f";
        var pending = Path.Combine(_b.Options.StateDirectory, uuid, "checkpoints", "pending.json");
        var snapshot = new Checkpoints.CheckpointSnapshot(uuid, "hosta", 1700000000,
            ["<domaincheckpoint><name>c1</name><creationTime>1</creationTime></domaincheckpoint>"]);
        var peerB = _a.Options.Peers.Single(p => p.Name == "hostb");
        _b.AnnounceIncoming("test", uuid);

        // Someone else's certificate from the same CA, claiming to be hosta.
        var rogue = _certs!.Issue("hostc-client", "hostc", ["hostc"], []);
        var impostor = BFMig.Transfer.Wire.TlsPeerAuthenticator.FromPemFiles(rogue.Cert, rogue.Key, _certs.Ca, "127.0.0.1");
        await Assert.ThrowsAnyAsync<Exception>(() => Checkpoints.CheckpointExchange.SendAsync(peerB.Host, peerB.Port, impostor, "hosta", Guid.Parse(uuid),
            snapshot, TimeSpan.FromSeconds(10), CancellationToken.None));
        Assert.False(File.Exists(pending), "a sender whose certificate names another host stored checkpoints");

        var auth = Transfers.PeerCredentials.ForSending(_a.Options, peerB);
        Assert.True(auth.HidesHello);
        await Checkpoints.CheckpointExchange.SendAsync(peerB.Host, peerB.Port, auth, "hosta", Guid.Parse(uuid), snapshot,
            TimeSpan.FromSeconds(10), CancellationToken.None);
        Assert.True(File.Exists(pending));
        Assert.Contains("c1", File.ReadAllText(pending));
        Assert.Contains($"guest {uuid}: received 1 checkpoint(s) from hosta", _b.Log);
    }
}
