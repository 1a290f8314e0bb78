using System.Diagnostics;

namespace BFMig.Cli.Tests;

public sealed record CliResult(int ExitCode, string Stdout, string Stderr)
{
    public override string ToString() => $"exit {ExitCode}\n--- stdout\n{Stdout}--- stderr\n{Stderr}";
}

/// <summary>Runs the built bfmig (its apphost, copied next to the tests) as a child process.</summary>
public static class CliRunner
{
    private static readonly TimeSpan Timeout = TimeSpan.FromSeconds(30);

    /// <summary>The build's apphost, or BFMIG_CLI (e.g. the native-AOT publish output) to test that binary instead.</summary>
    public static string Executable { get; } =
        Environment.GetEnvironmentVariable("BFMIG_CLI") is { Length: > 0 } path ? path : Path.Combine(AppContext.BaseDirectory, "bfmig");

    /// <summary>
    /// Runs bfmig with <paramref name="args"/>. The environment is ours minus BFMIG_* and
    /// DBUS_SYSTEM_BUS_ADDRESS, plus <paramref name="environment"/>.
    /// </summary>
    public static CliResult Run(IEnumerable<string> args, IReadOnlyDictionary<string, string>? environment = null)
    {
        var start = new ProcessStartInfo(Executable, args)
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            RedirectStandardInput = true,
        };
        foreach (string key in start.Environment.Keys.Where(k => k.StartsWith("BFMIG_", StringComparison.Ordinal) || k == "DBUS_SYSTEM_BUS_ADDRESS").ToList())
        {
            start.Environment.Remove(key);
        }
        foreach (var (key, value) in environment ?? new Dictionary<string, string>())
        {
            start.Environment[key] = value;
        }
        using Process process = Process.Start(start) ?? throw new InvalidOperationException("could not start bfmig");
        process.StandardInput.Close();
        Task<string> stdout = process.StandardOutput.ReadToEndAsync();
        Task<string> stderr = process.StandardError.ReadToEndAsync();
        if (!process.WaitForExit(Timeout))
        {
            process.Kill(entireProcessTree: true);
            throw new TimeoutException($"bfmig {string.Join(' ', args)} did not finish in {Timeout.TotalSeconds} s");
        }
        process.WaitForExit();
        return new CliResult(process.ExitCode, stdout.Result, stderr.Result);
    }
}
