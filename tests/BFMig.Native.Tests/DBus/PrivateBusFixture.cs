using System.Diagnostics;
using BFMig.Tests.Shared;

namespace BFMig.Native.Tests.DBus;

/// <summary>The shared private dbus-daemon, plus a runner for the command line tools the tests compare with.</summary>
public sealed class PrivateBusFixture() : PrivateDBusDaemon("bfmig-dbus-")
{
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
}
