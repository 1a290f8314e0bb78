using System.Diagnostics;

namespace BFMig.Native.Tests.DBus;

/// <summary>
/// A private dbus-daemon (real one, not the system bus) listening on a socket in a temporary
/// directory that unprivileged users can reach, so tests can call in as another uid.
/// Killed by pid when the tests finish.
/// </summary>
public sealed class PrivateBusFixture : IDisposable
{
    private readonly Process _daemon;

    public PrivateBusFixture()
    {
        Directory = System.IO.Directory.CreateTempSubdirectory("bfmig-dbus-");
        // Traversable by everyone: the uid test connects as nobody.
        File.SetUnixFileMode(Directory.FullName, UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.UserExecute
            | UnixFileMode.GroupExecute | UnixFileMode.OtherExecute | UnixFileMode.GroupRead | UnixFileMode.OtherRead);
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
            throw new InvalidOperationException($"dbus-daemon did not print its address: {_daemon.StandardError.ReadToEnd()}");
        }
        Address = line.Result.Trim();
    }

    public DirectoryInfo Directory { get; }

    /// <summary>The bus address as dbus-daemon printed it (unix:path=...,guid=...).</summary>
    public string Address { get; }

    /// <summary>Runs a command line tool (busctl, dbus-send) and returns exit code, stdout, stderr.</summary>
    public static (int ExitCode, string Stdout, string Stderr) Run(string file, params string[] arguments)
    {
        var start = new ProcessStartInfo(file, arguments) { RedirectStandardOutput = true, RedirectStandardError = true };
        using Process process = Process.Start(start) ?? throw new InvalidOperationException($"could not start {file}");
        Task<string> stdout = process.StandardOutput.ReadToEndAsync();
        Task<string> stderr = process.StandardError.ReadToEndAsync();
        if (!process.WaitForExit(TimeSpan.FromSeconds(20)))
        {
            process.Kill(entireProcessTree: true);
            throw new TimeoutException($"{file} {string.Join(' ', arguments)} did not finish in 20 s");
        }
        return (process.ExitCode, stdout.Result, stderr.Result);
    }

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
