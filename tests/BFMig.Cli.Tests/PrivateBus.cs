using System.Diagnostics;

namespace BFMig.Cli.Tests;

/// <summary>
/// A private dbus-daemon (the real one) on a unix socket in a temporary directory, with a
/// permissive policy; killed by pid when the tests finish.
/// </summary>
public sealed class PrivateBus : IDisposable
{
    private readonly Process _daemon;

    public PrivateBus()
    {
        Directory = System.IO.Directory.CreateTempSubdirectory("bfmig-cli-dbus-");
        string socket = Path.Combine(Directory.FullName, "bus");
        string config = Path.Combine(Directory.FullName, "bus.conf");
        File.WriteAllText(config, $"""
            <!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
              "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
            <busconfig>
              <type>custom</type>
              <listen>unix:path={socket}</listen>
              <auth>EXTERNAL</auth>
              <policy context="default">
                <allow user="*"/>
                <allow own="*"/>
                <allow send_type="method_call"/>
                <allow send_type="signal"/>
                <allow send_type="method_return"/>
                <allow send_type="error"/>
                <allow receive_type="method_call"/>
                <allow receive_type="signal"/>
                <allow receive_type="method_return"/>
                <allow receive_type="error"/>
              </policy>
            </busconfig>
            """);
        var start = new ProcessStartInfo("dbus-daemon", ["--config-file=" + config, "--print-address", "--nofork"])
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
        };
        _daemon = Process.Start(start) ?? throw new InvalidOperationException("could not start dbus-daemon");
        Task<string?> line = _daemon.StandardOutput.ReadLineAsync();
        if (!line.Wait(TimeSpan.FromSeconds(10)) || string.IsNullOrEmpty(line.Result))
        {
            Kill();
            throw new InvalidOperationException($"dbus-daemon did not print its address: {_daemon.StandardError.ReadToEnd()}");
        }
        Address = line.Result.Trim();
    }

    public DirectoryInfo Directory { get; }

    /// <summary>The bus address as dbus-daemon printed it (unix:path=...,guid=...).</summary>
    public string Address { get; }

    private void Kill()
    {
        try
        {
            if (!_daemon.HasExited)
            {
                _daemon.Kill();
                _daemon.WaitForExit(5000);
            }
        }
        catch (InvalidOperationException)
        {
            // Already gone.
        }
    }

    public void Dispose()
    {
        Kill();
        _daemon.Dispose();
        Directory.Delete(recursive: true);
    }
}

[CollectionDefinition(Name)]
public sealed class BusCollection : ICollectionFixture<PrivateBus>
{
    public const string Name = "private bus";
}
