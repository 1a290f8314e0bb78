using System.Diagnostics;
using System.Text;
using System.Text.Json;
using Xunit;
using Xunit.Abstractions;

namespace BFMig.Lab.Tests;

/// <summary>Runs <c>lab/lab</c> from the repository and returns what it printed.</summary>
internal sealed class LabRunner(ITestOutputHelper output)
{
    /// <summary>The repository root: the first directory above the test binaries holding BFMig.sln.</summary>
    public static string RepoRoot { get; } = FindRepoRoot();

    /// <summary>Path of the lab's entry script.</summary>
    public static string LabScript => Path.Combine(RepoRoot, "lab", "lab");

    /// <summary>
    /// The lab instance the tests drive: <c>BFMIG_LAB_NAME</c> when it is set (so that several
    /// checkouts on one machine can each test in their own lab), else the default <c>bfmig-lab</c>.
    /// </summary>
    public static string LabName { get; } = ChooseLabName();

    /// <summary>The lock lab/lab takes for <see cref="LabName"/>.</summary>
    public static string LockPath => $"/run/{LabName}.lock";

    /// <summary>Runs <c>lab/lab ARGS</c>; fails the test when it exits non-zero or outlives <paramref name="timeout"/>.</summary>
    public string Run(TimeSpan timeout, params string[] args)
    {
        var result = TryRun(timeout, args);
        Assert.True(result.ExitCode == 0, $"lab {string.Join(' ', args)} exited {result.ExitCode}:\n{result.Output}");
        return result.Output;
    }

    /// <summary>Runs <c>lab/lab ARGS</c> and returns its exit code and combined output.</summary>
    public (int ExitCode, string Output) TryRun(TimeSpan timeout, params string[] args)
    {
        var psi = new ProcessStartInfo(LabScript)
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            UseShellExecute = false,
        };
        // The collection fixture holds the lab lock for all lab tests.
        psi.Environment["BFMIG_LAB_LOCK_HELD"] = "1";
        // The same instance whose lock the collection holds.
        psi.Environment["BFMIG_LAB_NAME"] = LabName;
        foreach (var arg in args)
        {
            psi.ArgumentList.Add(arg);
        }

        var text = new StringBuilder();
        using var process = new Process { StartInfo = psi };
        process.OutputDataReceived += (_, e) => Append(text, e.Data);
        process.ErrorDataReceived += (_, e) => Append(text, e.Data);
        process.Start();
        process.BeginOutputReadLine();
        process.BeginErrorReadLine();
        if (!process.WaitForExit(timeout))
        {
            // Where it hangs, read before the kill: CI shows only the message's last lines.
            IReadOnlyList<HangReport.Stuck> stuck;
            IReadOnlyList<string> jobs = [];
            try
            {
                stuck = HangReport.StillRunning(process.Id);
                jobs = HangReport.MigrationJobs(LabScript, LabName);
            }
            finally
            {
                process.Kill(entireProcessTree: true);
                process.WaitForExit();
            }

            var printed = text.ToString();
            output.WriteLine(printed);
            Assert.Fail($"lab {string.Join(' ', args)} did not finish within {timeout}\n{HangReport.Describe(printed, stuck, jobs)}");
        }

        process.WaitForExit();
        var all = text.ToString();
        output.WriteLine($"$ lab {string.Join(' ', args)}  (exit {process.ExitCode})");
        output.WriteLine(all);
        return (process.ExitCode, all);
    }

    /// <summary>Reads a result file written by <c>lab scenario roundtrip --json</c>.</summary>
    public static JsonDocument ReadResult(string path) => JsonDocument.Parse(File.ReadAllBytes(path));

    private static void Append(StringBuilder text, string? line)
    {
        if (line is null)
        {
            return;
        }

        lock (text)
        {
            text.AppendLine(line);
        }
    }

    private static string ChooseLabName()
    {
        var name = Environment.GetEnvironmentVariable("BFMIG_LAB_NAME");
        if (string.IsNullOrEmpty(name))
        {
            return "bfmig-lab";
        }
        // lab/lab's own rule: the name becomes namespace, directory and lock file names.
        if (!System.Text.RegularExpressions.Regex.IsMatch(name, "^[a-z][a-z0-9-]{0,20}$"))
        {
            throw new InvalidOperationException($"BFMIG_LAB_NAME '{name}' is not a lab name ([a-z][a-z0-9-]*, at most 21 characters)");
        }
        return name;
    }

    private static string FindRepoRoot()
    {
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
        {
            if (File.Exists(Path.Combine(dir.FullName, "BFMig.sln")))
            {
                return dir.FullName;
            }
        }

        throw new InvalidOperationException($"no BFMig.sln above {AppContext.BaseDirectory}");
    }
}
