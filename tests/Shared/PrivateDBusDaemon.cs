using System.Diagnostics;

namespace BFMig.Tests.Shared;

/// <summary>
/// A real dbus-daemon (not the system bus) on a unix socket in a temporary directory, with a
/// permissive policy. The directory is traversable by every uid because some tests call in as
/// nobody (65534) to prove the root-only checks. Killed by pid on dispose.
/// </summary>
/// <remarks>Linked into each test project that needs a bus, so the three copies cannot drift.</remarks>
public class PrivateDBusDaemon : IDisposable
{
    private readonly Process _daemon;

    public PrivateDBusDaemon(string directoryPrefix = "bfmig-dbus-")
    {
        Directory = System.IO.Directory.CreateTempSubdirectory(directoryPrefix);
        File.SetUnixFileMode(Directory.FullName, (UnixFileMode)0b111_101_101);
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
                <allow eavesdrop="false"/>
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
            string stderr = _daemon.HasExited ? _daemon.StandardError.ReadToEnd() : "(still running)";
            throw new InvalidOperationException($"dbus-daemon did not print its address: {stderr}");
        }
        // Without the guid the same string works for Tmds.DBus.Protocol, busctl --address and bfmigd's bus_address.
        Address = "unix:path=" + socket;
    }

    public DirectoryInfo Directory { get; }

    /// <summary><c>unix:path=...</c> of the bus socket.</summary>
    public string Address { get; }

    public int Pid => _daemon.Id;

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
        try
        {
            Directory.Delete(recursive: true);
        }
        catch (IOException)
        {
            // A socket file still being unlinked by the dying daemon; the temp dir is harmless.
        }
        GC.SuppressFinalize(this);
    }
}
