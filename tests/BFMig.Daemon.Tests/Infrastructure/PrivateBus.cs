using System.Diagnostics;

namespace BFMig.Daemon.Tests.Infrastructure;

/// <summary>
/// A real, private dbus-daemon on a unix socket in a temporary directory that every uid can
/// reach (the non-root tests call in as uid 65534). Killed by pid on dispose.
/// </summary>
public sealed class PrivateBus : IDisposable
{
    private readonly Process _daemon;

    public PrivateBus()
    {
        Directory = System.IO.Directory.CreateTempSubdirectory("bfmigd-bus-");
        File.SetUnixFileMode(Directory.FullName, (UnixFileMode)0b111_101_101);
        var socket = Path.Combine(Directory.FullName, "bus");
        var config = Path.Combine(Directory.FullName, "bus.conf");
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
        var line = _daemon.StandardOutput.ReadLineAsync();
        if (!line.Wait(TimeSpan.FromSeconds(10)) || string.IsNullOrEmpty(line.Result))
        {
            Dispose();
            throw new InvalidOperationException("dbus-daemon did not print its address");
        }
        Address = "unix:path=" + socket;
    }

    public DirectoryInfo Directory { get; }

    /// <summary><c>unix:path=...</c>, for the daemon's bus_address and for busctl --address.</summary>
    public string Address { get; }

    public int Pid => _daemon.Id;

    public void Dispose()
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
        }
        _daemon.Dispose();
        try
        {
            Directory.Delete(recursive: true);
        }
        catch (IOException)
        {
        }
    }
}
