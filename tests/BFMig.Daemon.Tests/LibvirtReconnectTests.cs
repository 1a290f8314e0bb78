using System.Diagnostics;
using BFMig.Daemon.Tests.Infrastructure;
using BFMig.Native.Libvirt;
using Xunit.Abstractions;

namespace BFMig.Daemon.Tests;

/// <summary>
/// A real, private libvirtd (own mount namespace: tmpfs /run and libvirt state; its socket in a
/// temporary directory) serving the test driver remotely. The daemon follows it, loses it when
/// it is killed, and comes back to it (and to its events) when it restarts.
/// </summary>
public sealed class LibvirtReconnectTests(ITestOutputHelper output) : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("bfmigd-libvirtd-").FullName;
    private Process? _libvirtd;

    public void Dispose()
    {
        StopLibvirtd();
        try
        {
            Directory.Delete(_dir, recursive: true);
        }
        catch (IOException)
        {
        }
    }

    private string Socket => Path.Combine(_dir, "sock", "libvirt-sock");

    private string Uri => $"test+unix:///default?socket={Socket}";

    private void StartLibvirtd()
    {
        Directory.CreateDirectory(Path.Combine(_dir, "sock"));
        File.WriteAllText(Path.Combine(_dir, "libvirtd.conf"), $"""
            unix_sock_dir = "{_dir}/sock"
            auth_unix_rw = "none"
            auth_unix_ro = "none"
            """);
        var script = Path.Combine(_dir, "run.sh");
        File.WriteAllText(script, $"""
            #!/bin/sh
            mount -t tmpfs bfmig-test-run /run && mount -t tmpfs bfmig-test-lib /var/lib/libvirt && mount -t tmpfs bfmig-test-cache /var/cache/libvirt || exit 1
            exec libvirtd --config {_dir}/libvirtd.conf --pid-file {_dir}/libvirtd.pid
            """);
        File.SetUnixFileMode(script, (UnixFileMode)0b111_101_101);
        File.Delete(Socket);
        var start = new ProcessStartInfo("unshare", ["-m", "--propagation", "private", script])
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
        };
        _libvirtd = Process.Start(start)!;
        _libvirtd.OutputDataReceived += (_, _) => { };
        _libvirtd.ErrorDataReceived += (_, _) => { };
        _libvirtd.BeginOutputReadLine();
        _libvirtd.BeginErrorReadLine();
        var deadline = DateTime.UtcNow.AddSeconds(20);
        while (!File.Exists(Socket))
        {
            if (_libvirtd.HasExited || DateTime.UtcNow > deadline)
                Assert.Fail($"private libvirtd did not come up (exited: {_libvirtd.HasExited})");
            Thread.Sleep(50);
        }
    }

    private void StopLibvirtd()
    {
        if (_libvirtd is null)
            return;
        // unshare execs the script, which execs libvirtd: this pid is libvirtd's.
        if (!_libvirtd.HasExited)
        {
            _libvirtd.Kill();
            _libvirtd.WaitForExit(10_000);
        }
        _libvirtd.Dispose();
        _libvirtd = null;
    }

    [Fact]
    public async Task The_daemon_reconnects_when_libvirtd_restarts_and_follows_events_again()
    {
        if (!Prerequisite.Require(File.Exists("/usr/sbin/libvirtd") && File.Exists("/usr/bin/unshare"), "libvirtd and unshare", output))
            return;
        StartLibvirtd();
        using var bus = new PrivateBus();
        var host = DaemonHost.Start(bus, DaemonHost.Ini("hosta", "hostb", 9).Replace("test:///default", Uri, StringComparison.Ordinal));
        try
        {
            var mig = Path.Combine(host.Options.RuntimeDirectory, "hostb", "test.mig");
            Assert.True(File.Exists(mig));
            Assert.Equal(1, host.Daemon.Libvirt!.Connects);

            StopLibvirtd();
            await Tools.UntilAsync(() => !host.Daemon.Libvirt.IsConnected, "the daemon to notice libvirtd is gone", 30);
            await Tools.UntilAsync(() => host.Log.Contains("libvirt connection to test+unix", StringComparison.Ordinal), "the loss to be logged", 30);

            StartLibvirtd();
            await Tools.UntilAsync(() => host.Daemon.Libvirt.Connects >= 2 && host.Daemon.Libvirt.IsConnected, "the daemon to reconnect", 30);
            Assert.True(File.Exists(mig), "the running guest keeps its sockets across the reconnect");

            // Events flow on the new connection: stopping the guest removes its sockets.
            using (var libvirt = LibvirtConnection.Open(Uri))
            using (var domain = libvirt.LookupDomainByName("test"))
                domain.Destroy();
            await Tools.UntilAsync(() => !File.Exists(mig), "sockets removed after the guest stopped on the new connection", 30);
        }
        finally
        {
            output.WriteLine(host.Log);
            await host.DisposeAsync();
        }
    }
}

/// <summary>
/// Tests that need something this machine may lack: under CI=true a missing prerequisite fails
/// the test; locally the test prints why and returns.
/// </summary>
internal static class Prerequisite
{
    public static bool Require(bool present, string what, ITestOutputHelper output)
    {
        if (present)
            return true;
        if (string.Equals(Environment.GetEnvironmentVariable("CI"), "true", StringComparison.OrdinalIgnoreCase))
            Assert.Fail($"prerequisite missing (CI=true, so this fails): {what}");
        output.WriteLine($"SKIPPED: prerequisite missing: {what}");
        return false;
    }
}
