using System.Text.Json;

namespace BFMig.Cli.Tests;

/// <summary>doctor with the daemon (its checks) and without (the local checks, real libvirt test driver).</summary>
public sealed class DoctorTests : CliTestBase
{
    private readonly DirectoryInfo _scratch = Directory.CreateTempSubdirectory("bfmig-cli-doctor-");

    public DoctorTests(PrivateBus bus) : base(bus)
    {
    }

    [Fact]
    public void With_daemon_all_passing_exits_0()
    {
        CliResult result = Bfmig("doctor");
        Assert.Equal(0, result.ExitCode);
        Assert.Equal(
        [
            $"PASS  daemon      bfmigd answers on the bus at {Bus.Address}",
            "PASS  hook        /etc/libvirt/hooks/qemu.d/50-bfmig present",
            "PASS  peer hostB  reachable, authenticated",
            "all 3 checks passed",
        ], Lines(result.Stdout));
    }

    [Fact]
    public void With_daemon_one_failing_exits_1_text_and_json()
    {
        Daemon.Checks.Add(("peer hostC", false, "connection refused"));
        CliResult text = Bfmig("doctor");
        Assert.Equal(1, text.ExitCode);
        Assert.Contains("FAIL  peer hostC  connection refused", Lines(text.Stdout));
        Assert.Equal("1 of 4 checks failed", Lines(text.Stdout)[^1]);

        CliResult jsonResult = Bfmig("doctor", "--json");
        Assert.Equal(1, jsonResult.ExitCode);
        JsonElement json = Json(jsonResult);
        Assert.False(json.GetProperty("ok").GetBoolean());
        JsonElement[] checks = [.. json.GetProperty("checks").EnumerateArray()];
        Assert.Equal(["daemon", "hook", "peer hostB", "peer hostC"], checks.Select(c => c.GetProperty("name").GetString()));
        Assert.Equal([true, true, true, false], checks.Select(c => c.GetProperty("passed").GetBoolean()));
        Assert.Equal("connection refused", checks[3].GetProperty("detail").GetString());
    }

    [Fact]
    public void Without_daemon_reports_it_and_runs_local_checks_that_pass()
    {
        Daemon.Dispose();
        CliResult result = BfmigWith(LocalEnvironment(hookMode: "755", runMode: "755", libvirt: "test:///default"), "doctor");
        Assert.Equal(1, result.ExitCode);
        string[] lines = Lines(result.Stdout);
        Assert.Equal(5, lines.Length);
        Assert.Matches($@"^FAIL  daemon\s+bfmigd is not running on the bus at {System.Text.RegularExpressions.Regex.Escape(Bus.Address)}", lines[0]);
        Assert.Matches(@"^PASS  hook\s+.*/50-bfmig present and executable \(mode 0755\)$", lines[1]);
        Assert.Matches(@"^PASS  run-directory\s+.*/run exists with mode 0755$", lines[2]);
        Assert.Matches(@"^PASS  libvirt\s+test:///default reachable \(libvirt \d+\.\d+\.\d+ on .+\)$", lines[3]);
        Assert.Equal("1 of 4 checks failed", lines[4]);
    }

    [Fact]
    public void Without_daemon_local_failures_are_named_json()
    {
        Daemon.Dispose();
        CliResult result = BfmigWith(LocalEnvironment(hookMode: "644", runMode: "777", libvirt: "bogus+nothing:///nowhere"), "doctor", "--json");
        Assert.Equal(1, result.ExitCode);
        JsonElement json = Json(result);
        Assert.False(json.GetProperty("ok").GetBoolean());
        Dictionary<string, (bool Passed, string Detail)> checks = json.GetProperty("checks").EnumerateArray()
            .ToDictionary(c => c.GetProperty("name").GetString()!, c => (c.GetProperty("passed").GetBoolean(), c.GetProperty("detail").GetString()!));
        Assert.Equal(["daemon", "hook", "run-directory", "libvirt"], checks.Keys);
        Assert.All(checks.Values, c => Assert.False(c.Passed));
        Assert.Contains("is not executable (mode 0644)", checks["hook"].Detail, StringComparison.Ordinal);
        Assert.Contains("is world-writable (mode 0777)", checks["run-directory"].Detail, StringComparison.Ordinal);
        Assert.StartsWith("bogus+nothing:///nowhere not reachable: ", checks["libvirt"].Detail, StringComparison.Ordinal);
    }

    [Fact]
    public void Without_daemon_missing_hook_and_run_directory()
    {
        Daemon.Dispose();
        var environment = new Dictionary<string, string>
        {
            ["BFMIG_HOOK_PATH"] = Path.Combine(_scratch.FullName, "absent-hook"),
            ["BFMIG_RUN_DIR"] = Path.Combine(_scratch.FullName, "absent-run"),
            ["BFMIG_LIBVIRT_URI"] = "test:///default",
        };
        CliResult result = BfmigWith(environment, "doctor");
        Assert.Equal(1, result.ExitCode);
        string[] lines = Lines(result.Stdout);
        Assert.Matches(@"^FAIL  hook\s+.*/absent-hook is missing: ", lines[1]);
        Assert.Matches(@"^FAIL  run-directory\s+.*/absent-run is missing: ", lines[2]);
        Assert.Equal("3 of 4 checks failed", lines[^1]);
    }

    private Dictionary<string, string> LocalEnvironment(string hookMode, string runMode, string libvirt)
    {
        string hook = Path.Combine(_scratch.FullName, "50-bfmig");
        File.WriteAllText(hook, "#!/bin/sh\nexit 0\n");
        File.SetUnixFileMode(hook, (UnixFileMode)Convert.ToInt32(hookMode, 8));
        DirectoryInfo run = _scratch.CreateSubdirectory("run");
        File.SetUnixFileMode(run.FullName, (UnixFileMode)Convert.ToInt32(runMode, 8));
        return new Dictionary<string, string>
        {
            ["BFMIG_HOOK_PATH"] = hook,
            ["BFMIG_RUN_DIR"] = run.FullName,
            ["BFMIG_LIBVIRT_URI"] = libvirt,
        };
    }

    public override void Dispose()
    {
        _scratch.Delete(recursive: true);
        base.Dispose();
    }
}
