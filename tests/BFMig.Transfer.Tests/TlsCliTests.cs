using System.Diagnostics;
using System.Net;
using System.Net.Sockets;
using System.Text.Json.Nodes;
using BFMig.Tests.Shared;
using Xunit.Abstractions;

namespace BFMig.Transfer.Tests;

/// <summary>
/// Two bfmig-transfer processes over loopback TCP with mutual TLS from PEM files made by openssl,
/// as libvirt keeps them: a stream from a fake source QEMU (unix socket) reaches a fake
/// destination QEMU only when both certificates chain to the trusted CA, are valid now and the
/// receiver's names the host the sender expects; otherwise both helpers fail with a line saying
/// why, and the destination never sees a connection.
/// </summary>
public sealed class TlsCliTests(ITestOutputHelper output) : IDisposable
{
    private static readonly Guid Guest = Guid.Parse("0e5b3a52-6a0b-4d59-8c1e-2f7b9c3d4e11");
    private readonly string _dir = Directory.CreateTempSubdirectory("bfmig-tlscli-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    // ReceiverError: what the receiver reports its failure with, its stats' error (bfmigd reads that), else its stderr.
    private sealed record Run(int SenderExit, int ReceiverExit, string SenderError, string ReceiverError, string ReceiverStderr, bool DestinationConnected, byte[] Arrived, JsonNode? ReceiverStats);

    private async Task<Run> TripAsync(string[] senderTls, string[] receiverTls, byte[] payload)
    {
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(60));
        string exe = Path.Combine(AppContext.BaseDirectory, "bfmig-transfer");
        string source = Path.Combine(_dir, "src.sock");
        string destination = Path.Combine(_dir, "dst.sock");
        string receiverStats = Path.Combine(_dir, "recv.json");
        File.Delete(source);
        File.Delete(destination);
        File.Delete(receiverStats);
        int port;
        using (var probe = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp))
        {
            probe.Bind(new IPEndPoint(IPAddress.Loopback, 0));
            port = ((IPEndPoint)probe.LocalEndPoint!).Port;
        }
        using var dst = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        dst.Bind(new UnixDomainSocketEndPoint(destination));
        dst.Listen(1);
        bool connected = false;
        var arrived = Task.Run(async () =>
        {
            using var qemu = await dst.AcceptAsync(cts.Token);
            connected = true;
            using var all = new MemoryStream();
            var buffer = new byte[65536];
            int n;
            while ((n = await qemu.ReceiveAsync(buffer, SocketFlags.None, cts.Token)) > 0)
                all.Write(buffer, 0, n);
            return all.ToArray();
        });
        using var receiver = Start(exe, ["receive", "--kind", "mig", "--no-store", "--listen", $"tcp:127.0.0.1:{port}", "--connect", $"unix:{destination}",
            "--guest", Guest.ToString(), "--name", "hostb", "--accept-timeout", "30", "--stats", receiverStats, .. receiverTls]);
        using var sender = Start(exe, ["send", "--kind", "mig", "--no-store", "--listen", $"unix:{source}", "--peer", $"tcp:127.0.0.1:{port}",
            "--guest", Guest.ToString(), "--peer-name", "hostb", "--name", "hosta", "--accept-timeout", "30", .. senderTls]);
        try
        {
            while (!File.Exists(source))
            {
                if (sender.HasExited)
                    Assert.Fail("sender exited before listening: " + await sender.StandardError.ReadToEndAsync(cts.Token));
                await Task.Delay(20, cts.Token);
            }
            using (var qemu = await ConnectSourceAsync(source, cts.Token))
            {
                try
                {
                    if (qemu is not null)
                        await SendAllAsync(qemu, payload, cts.Token);
                }
                catch (SocketException)
                {
                    // A refused trip may close the source's connection while it still writes.
                }
            }
            await sender.WaitForExitAsync(cts.Token);
            await receiver.WaitForExitAsync(cts.Token);
        }
        finally
        {
            foreach (var p in new[] { sender, receiver })
            {
                if (!p.HasExited)
                    p.Kill();
            }
        }
        string se = (await sender.StandardError.ReadToEndAsync(cts.Token)).Trim();
        string re = (await receiver.StandardError.ReadToEndAsync(cts.Token)).Trim();
        output.WriteLine($"sender exit {sender.ExitCode}: {se}\nreceiver exit {receiver.ExitCode}: {re}");
        byte[] got = [];
        if (arrived.Wait(TimeSpan.FromSeconds(connected ? 30 : 1)))
            got = arrived.Result;
        var stats = File.Exists(receiverStats) ? JsonNode.Parse(await File.ReadAllTextAsync(receiverStats, cts.Token)) : null;
        string receiverError = stats?["error"]?.GetValue<string>() ?? re;
        return new Run(sender.ExitCode, receiver.ExitCode, se, receiverError, re, connected, got, stats);
    }

    // The source QEMU: writes the stream, ends it, and reads until the sender closes.
    private static async Task SendAllAsync(Socket qemu, byte[] payload, CancellationToken ct)
    {
        await qemu.SendAsync(payload, SocketFlags.None, ct);
        qemu.Shutdown(SocketShutdown.Send);
        while (await qemu.ReceiveAsync(new byte[4096], SocketFlags.None, ct) > 0)
        {
        }
    }

    // The socket file appears at bind(), a moment before listen(): a connect in between is
    // refused (a CI rehearsal: the sender then waited 30 s for a source that had given up), so
    // the source retries as the helpers do (Endpoint.ConnectAsync).
    private static async Task<Socket?> ConnectSourceAsync(string path, CancellationToken ct)
    {
        try
        {
            return await Endpoint.Parse($"unix:{path}").ConnectAsync(TimeSpan.FromSeconds(5), ct);
        }
        catch (SocketException)
        {
            // A refused trip may end the sender before the source connects: its exit says why.
            return null;
        }
    }

    private static Process Start(string exe, string[] args)
    {
        var psi = new ProcessStartInfo(exe) { RedirectStandardError = true, RedirectStandardOutput = true, UseShellExecute = false };
        foreach (string a in args)
            psi.ArgumentList.Add(a);
        return Process.Start(psi) ?? throw new InvalidOperationException($"{exe} did not start");
    }

    private static string[] Tls((string Cert, string Key) c, string ca, string? peerName = null) =>
        peerName is null ? ["--tls-cert", c.Cert, "--tls-key", c.Key, "--tls-ca", ca] : ["--tls-cert", c.Cert, "--tls-key", c.Key, "--tls-ca", ca, "--tls-peer-name", peerName];

    private bool RequireOpenssl()
    {
        if (TestCertificates.Available)
            return true;
        if (Nbd.TestEnv.IsCi)
            Assert.Fail("openssl is required (CI=true)");
        output.WriteLine("skipped: openssl not installed");
        return false;
    }

    [Fact]
    public async Task Certificates_of_one_ca_carry_the_stream_and_check_the_receivers_name()
    {
        if (!RequireOpenssl())
            return;
        using var certs = TestCertificates.Create();
        var server = certs.Issue("hostb-server", "hostb", ["hostb"], ["127.0.0.1"]);
        var client = certs.Issue("hosta-client", "hosta", ["hosta"], []);
        var payload = new byte[3 << 20];
        new Random(5).NextBytes(payload);
        var run = await TripAsync(Tls(client, certs.Ca, "hostb"), Tls(server, certs.Ca), payload);
        Assert.Equal((0, 0), (run.SenderExit, run.ReceiverExit));
        Assert.True(run.DestinationConnected);
        Assert.True(payload.AsSpan().SequenceEqual(run.Arrived), $"{run.Arrived.Length} of {payload.Length} bytes arrived intact");
        // The peer's address works as the expected name too (a subject alternative name IP entry).
        var byAddress = await TripAsync(Tls(client, certs.Ca, "127.0.0.1"), Tls(server, certs.Ca), payload[..4096]);
        Assert.Equal((0, 0), (byAddress.SenderExit, byAddress.ReceiverExit));
    }

    [Theory]
    [InlineData("receiver signed by another CA", "is not trusted by the CA file: unable to get local issuer certificate")]
    [InlineData("sender signed by another CA", "is not trusted by the CA file: unable to get local issuer certificate")]
    [InlineData("receiver certificate expired", "is not trusted by the CA file: certificate has expired")]
    [InlineData("receiver is another host", "names none of hostc")]
    public async Task A_certificate_that_does_not_fit_fails_with_the_reason_and_moves_no_data(string fault, string reason)
    {
        if (!RequireOpenssl())
            return;
        using var certs = TestCertificates.Create();
        var server = fault switch
        {
            "receiver signed by another CA" => certs.Issue("bad-server", "hostb", ["hostb"], ["127.0.0.1"], ca: "otherca"),
            "receiver certificate expired" => certs.Issue("old-server", "hostb", ["hostb"], ["127.0.0.1"], days: -1),
            _ => certs.Issue("hostb-server", "hostb", ["hostb"], ["127.0.0.1"]),
        };
        var client = fault == "sender signed by another CA"
            ? certs.Issue("bad-client", "hosta", ["hosta"], [], ca: "otherca")
            : certs.Issue("hosta-client", "hosta", ["hosta"], []);
        string expectedName = fault == "receiver is another host" ? "hostc" : "hostb";
        var run = await TripAsync(Tls(client, certs.Ca, expectedName), Tls(server, certs.Ca), new byte[1 << 20]);

        Assert.False(run.DestinationConnected, "the destination QEMU was connected although TLS failed");
        Assert.Empty(run.Arrived);
        Assert.NotEqual(0, run.SenderExit);
        Assert.NotEqual(0, run.ReceiverExit);
        // The side that rejected the certificate says why (exit 5: authentication failed).
        bool receiverRejects = fault == "sender signed by another CA";
        var (exit, error) = receiverRejects ? (run.ReceiverExit, run.ReceiverError) : (run.SenderExit, run.SenderError);
        Assert.Equal(5, exit);
        Assert.Contains("TLS with", error);
        Assert.Contains(reason, error);
        if (fault == "receiver certificate expired")
            Assert.Contains("2026", error);
        // The side whose certificate was refused points at the other's log.
        Assert.Contains("peer rejected this host's certificate", receiverRejects ? run.SenderError : run.ReceiverError);
        // A receiver whose peer never proved itself writes no line of its own (anyone who can connect
        // could flood the journal so): its reason is in its stats, which bfmigd logs under its rate limit.
        Assert.Equal("", run.ReceiverStderr);
        Assert.Equal(0L, run.ReceiverStats?["streamBytes"]?.GetValue<long>() ?? 0L);
    }

    [Fact]
    public async Task Half_a_tls_setup_or_tls_with_a_psk_is_a_usage_error()
    {
        string exe = Path.Combine(AppContext.BaseDirectory, "bfmig-transfer");
        foreach (var args in new[]
        {
            new[] { "send", "--kind", "mig", "--fd", "3", "--peer", "tcp:127.0.0.1:9", "--guest", Guest.ToString(), "--peer-name", "b", "--tls-cert", "/x" },
            ["send", "--kind", "mig", "--fd", "3", "--peer", "tcp:127.0.0.1:9", "--guest", Guest.ToString(), "--peer-name", "b", "--tls-peer-name", "b"],
            ["send", "--kind", "mig", "--fd", "3", "--peer", "tcp:127.0.0.1:9", "--guest", Guest.ToString(), "--peer-name", "b",
                "--psk-file", "/x", "--tls-cert", "/a", "--tls-key", "/b", "--tls-ca", "/c"],
            ["receive", "--kind", "nbd", "--fd", "3", "--connect", "unix:/x", "--guest", Guest.ToString(), "--image", "drive-virtio-disk0=qcow2:relative.qcow2"],
            ["receive", "--kind", "nbd", "--fd", "3", "--connect", "unix:/x", "--guest", Guest.ToString(), "--image", "noformat"],
        })
        {
            using var p = Start(exe, args);
            string err = await p.StandardError.ReadToEndAsync();
            await p.WaitForExitAsync();
            output.WriteLine($"{string.Join(' ', args)} -> {p.ExitCode}: {err.Trim()}");
            Assert.Equal(2, p.ExitCode);
            Assert.Contains("bfmig-transfer", err);
        }
    }
}
