using System.Text.Json;
using BFMig.Cli;

namespace BFMig.Cli.Tests;

/// <summary>
/// migrate: --dry-run prints the exact virsh call; a real run executes a fake virsh (first on
/// PATH, records its argv, asks the fake daemon to emit progress, exits with a chosen status).
/// </summary>
public sealed class MigrateTests : CliTestBase
{
    private const string Vm1Uuid = "5f0c1c2e-0000-4000-8000-000000000001";
    private readonly DirectoryInfo _scratch = Directory.CreateTempSubdirectory("bfmig-cli-migrate-");

    public MigrateTests(PrivateBus bus) : base(bus)
    {
    }

    private string ArgvFile => Path.Combine(_scratch.FullName, "virsh-argv");

    private static readonly string[] ExpectedVirsh =
    [
        "migrate", "--live", "--persistent", "--copy-storage-all", "vm1", "qemu+ssh://hostB/system",
        "--migrateuri", "unix:///run/bfmig/hostB/vm1.mig", "--disks-uri", "unix:///run/bfmig/hostB/vm1.nbd",
    ];

    [Fact]
    public void Dry_run_prints_the_exact_virsh_command()
    {
        CliResult result = Bfmig("migrate", "vm1", "hostB", "--dry-run");
        Assert.Equal(0, result.ExitCode);
        Assert.Equal("virsh migrate --live --persistent --copy-storage-all vm1 qemu+ssh://hostB/system"
            + " --migrateuri unix:///run/bfmig/hostB/vm1.mig --disks-uri unix:///run/bfmig/hostB/vm1.nbd\n", result.Stdout);
        Assert.Equal(["PrepareMigration(vm1,hostB)"], Daemon.Calls);
    }

    [Fact]
    public void Dry_run_quotes_words_a_shell_would_split()
    {
        Daemon.Uris = ("qemu+ssh://root@host b/system", "unix:///run/bfmig/host b/it's.mig", "unix:///run/bfmig/b/x.nbd");
        CliResult result = Bfmig("migrate", "my vm", "host b", "--dry-run");
        Assert.Equal("virsh migrate --live --persistent --copy-storage-all 'my vm' 'qemu+ssh://root@host b/system'"
            + " --migrateuri 'unix:///run/bfmig/host b/it'\\''s.mig' --disks-uri unix:///run/bfmig/b/x.nbd\n", result.Stdout);
        // The quoting is right if a shell hands back the same words.
        string echoed = RunShell("printf '%s\\n' " + result.Stdout.Trim()["virsh ".Length..]);
        Assert.Equal(["migrate", "--live", "--persistent", "--copy-storage-all", "my vm", "qemu+ssh://root@host b/system",
            "--migrateuri", "unix:///run/bfmig/host b/it's.mig", "--disks-uri", "unix:///run/bfmig/b/x.nbd"], echoed.Split('\n', StringSplitOptions.RemoveEmptyEntries));
    }

    [Fact]
    public void Dry_run_json_has_the_uris_and_argv()
    {
        CliResult result = Bfmig("migrate", "vm1", "hostB", "--dry-run", "--json");
        // Written for terminals and scripts, not HTML: no \u002B for the '+' of qemu+ssh.
        Assert.Contains("\"qemu+ssh://hostB/system\"", result.Stdout, StringComparison.Ordinal);
        JsonElement json = Json(result);
        Assert.True(json.GetProperty("dry_run").GetBoolean());
        Assert.Equal("qemu+ssh://hostB/system", json.GetProperty("destination_uri").GetString());
        Assert.Equal("unix:///run/bfmig/hostB/vm1.mig", json.GetProperty("migrate_uri").GetString());
        Assert.Equal("unix:///run/bfmig/hostB/vm1.nbd", json.GetProperty("disks_uri").GetString());
        Assert.Equal(["virsh", .. ExpectedVirsh], json.GetProperty("command").EnumerateArray().Select(a => a.GetString()));
        Assert.Equal(JsonValueKind.Null, json.GetProperty("virsh_exit_code").ValueKind);
    }

    [Fact]
    public void Migrate_runs_virsh_and_shows_progress_from_signals()
    {
        Daemon.Guests.Add(new FakeGuest(Vm1Uuid, "vm1", "here", "", 2, 1, 1, 0));
        Daemon.OnKick = d =>
        {
            d.EmitProgress("vm1", "hostB", "memory", 1UL << 20, 255UL << 20);
            // Another guest's trip and another peer: not ours, must not count.
            d.EmitProgress("db1", "hostB", "memory", 99UL << 30, 0);
            d.EmitProgress("vm1", "hostC", "memory", 99UL << 30, 0);
            // The daemon may name the guest by UUID.
            d.EmitProgress(Vm1Uuid, "hostB", "vda", 3UL << 20, 765UL << 20);
            d.EmitProgress("vm1", "hostB", "memory", 2UL << 20, 510UL << 20);
            d.EmitFinished("vm1", "hostB", true, "switchover after 3 iterations");
        };
        CliResult result = Bfmig("migrate", "vm1", "hostB");
        Assert.Equal(0, result.ExitCode);
        Assert.Equal(ExpectedVirsh, File.ReadAllLines(ArgvFile));
        Assert.Equal(
        [
            "[#=============================] sent 1.0 MiB, saved 255.0 MiB (99.6% saved) | memory 1.0 MiB/255.0 MiB (sent/saved)",
            "[#=============================] sent 4.0 MiB, saved 1020.0 MiB (99.6% saved) | memory 1.0 MiB/255.0 MiB, vda 3.0 MiB/765.0 MiB (sent/saved)",
            "[#=============================] sent 5.0 MiB, saved 1.2 GiB (99.6% saved) | memory 2.0 MiB/510.0 MiB, vda 3.0 MiB/765.0 MiB (sent/saved)",
            "transfer finished: switchover after 3 iterations",
            "migrated vm1 to hostB: sent 5.0 MiB, saved 1.2 GiB (99.6% of the trip)",
        ], Lines(result.Stdout));
        Assert.Equal("", result.Stderr);
        Assert.Equal(["ListGuests()", "PrepareMigration(vm1,hostB)"], Daemon.Calls);
    }

    [Fact]
    public void Virsh_failure_is_exit_1_with_the_daemons_reason()
    {
        Daemon.OnKick = d =>
        {
            d.EmitProgress("vm1", "hostB", "memory", 1UL << 20, 0);
            d.EmitFinished("vm1", "hostB", false, "peer hostB closed the link");
        };
        CliResult result = Bfmig("migrate", "vm1", "hostB", exitCode: 1);
        Assert.Equal(1, result.ExitCode);
        Assert.Equal(ExpectedVirsh, File.ReadAllLines(ArgvFile));
        Assert.Contains("transfer failed: peer hostB closed the link", Lines(result.Stdout));
        Assert.DoesNotContain("migrated", result.Stdout, StringComparison.Ordinal);
        Assert.Equal("fake virsh: error: operation failed\n"
            + "bfmig: virsh migrate of vm1 to hostB failed (exit status 1): peer hostB closed the link\n", result.Stderr);
    }

    [Fact]
    public void Migrate_json_reports_streams_totals_and_virsh_status()
    {
        Daemon.OnKick = d =>
        {
            d.EmitProgress("vm1", "hostB", "memory", 100, 900);
            d.EmitProgress("vm1", "hostB", "vda", 50, 4000);
            d.EmitFinished("vm1", "hostB", true, "");
        };
        CliResult ok = Bfmig("migrate", "vm1", "hostB", "--json");
        Assert.Equal(0, ok.ExitCode);
        // JSON lines: one per progress signal as it comes, then the result.
        JsonElement[] lines = JsonLines(ok);
        Assert.Equal(3, lines.Length);
        Assert.Equal(["progress:memory:100:900", "progress:vda:50:4000"], lines[..2].Select(l =>
            $"{l.GetProperty("event").GetString()}:{l.GetProperty("stream").GetString()}:{l.GetProperty("bytes_sent").GetUInt64()}:{l.GetProperty("bytes_saved").GetUInt64()}"));
        Assert.All(lines[..2], l => Assert.Equal(("vm1", "hostB"), (l.GetProperty("guest").GetString(), l.GetProperty("peer").GetString())));
        JsonElement json = lines[^1];
        Assert.False(json.GetProperty("dry_run").GetBoolean());
        Assert.True(json.GetProperty("ok").GetBoolean());
        Assert.Equal(0, json.GetProperty("virsh_exit_code").GetInt32());
        Assert.Equal(150UL, json.GetProperty("bytes_sent").GetUInt64());
        Assert.Equal(4900UL, json.GetProperty("bytes_saved").GetUInt64());
        Assert.Equal(["memory:100:900", "vda:50:4000"], json.GetProperty("streams").EnumerateArray()
            .Select(s => $"{s.GetProperty("stream").GetString()}:{s.GetProperty("bytes_sent").GetUInt64()}:{s.GetProperty("bytes_saved").GetUInt64()}"));
        Assert.Equal(JsonValueKind.Null, json.GetProperty("message").ValueKind);

        CliResult failed = Bfmig("migrate", "vm1", "hostB", "--json", exitCode: 3);
        Assert.Equal(1, failed.ExitCode);
        JsonElement failedJson = JsonLines(failed)[^1];
        Assert.False(failedJson.GetProperty("ok").GetBoolean());
        Assert.Equal(3, failedJson.GetProperty("virsh_exit_code").GetInt32());
    }

    private static JsonElement[] JsonLines(CliResult result) =>
        [.. result.Stdout.Split('\n', StringSplitOptions.RemoveEmptyEntries).Select(line =>
        {
            using JsonDocument d = JsonDocument.Parse(line);
            return d.RootElement.Clone();
        })];

    [Fact]
    public void Fast_progress_is_thinned_out_but_the_last_state_is_shown()
    {
        Daemon.OnKick = d =>
        {
            for (ulong i = 1; i <= 200; i++)
            {
                d.EmitProgress("vm1", "hostB", "memory", i << 20, i << 21);
            }
            d.EmitFinished("vm1", "hostB", true, "");
        };
        CliResult result = Bfmig("migrate", "vm1", "hostB");
        Assert.Equal(0, result.ExitCode);
        string[] progress = [.. Lines(result.Stdout).Where(l => l.StartsWith('['))];
        Assert.InRange(progress.Length, 2, 10);
        Assert.Equal("[##########====================] sent 200.0 MiB, saved 400.0 MiB (66.7% saved) | memory 200.0 MiB/400.0 MiB (sent/saved)", progress[^1]);
        Assert.Equal("migrated vm1 to hostB: sent 200.0 MiB, saved 400.0 MiB (66.7% of the trip)", Lines(result.Stdout)[^1]);
    }

    [Fact]
    public void On_a_terminal_the_progress_line_is_redrawn_in_place()
    {
        Daemon.OnKick = d =>
        {
            d.EmitProgress("vm1", "hostB", "memory", 1UL << 20, 3UL << 20);
            d.EmitProgress("vm1", "hostB", "vda", 1UL << 20, 3UL << 20);
            d.EmitFinished("vm1", "hostB", true, "");
        };
        // script(1) gives bfmig a pseudo-terminal as standard output.
        string virshDirectory = WriteFakeVirsh(0);
        string command = Format.ShellCommand([CliRunner.Executable, "--bus-address", Bus.Address, "migrate", "vm1", "hostB"]);
        string output = RunShell($"PATH='{virshDirectory}':\"$PATH\" script -qec {Format.ShellCommand([command])} /dev/null");
        Assert.Contains("\r[########======================] sent 1.0 MiB, saved 3.0 MiB (75.0% saved) | memory 1.0 MiB/3.0 MiB (sent/saved)", output, StringComparison.Ordinal);
        Assert.Contains("\r[########======================] sent 2.0 MiB, saved 6.0 MiB (75.0% saved) | memory 1.0 MiB/3.0 MiB, vda 1.0 MiB/3.0 MiB (sent/saved)", output, StringComparison.Ordinal);
        Assert.Contains("migrated vm1 to hostB: sent 2.0 MiB, saved 6.0 MiB (75.0% of the trip)", output, StringComparison.Ordinal);
    }

    [Fact]
    public void Progress_from_another_connection_is_ignored()
    {
        // A signal that claims to be bfmigd's but comes from some other bus client.
        Daemon.OnKick = _ => RunShell($"dbus-send --bus='{Bus.Address}' --type=signal /org/bfmig/BFMig1 "
            + "org.bfmig.BFMig1.Manager.TransferProgress string:vm1 string:hostB string:memory uint64:666 uint64:0");
        CliResult result = Bfmig("migrate", "vm1", "hostB");
        Assert.Equal(0, result.ExitCode);
        Assert.Equal(["migrated vm1 to hostB: sent 0 B, saved 0 B (- of the trip)"], Lines(result.Stdout));
    }

    private CliResult Bfmig(string command, string guest, string peer, string? flag = null, int exitCode = 0) =>
        Bfmig(command, guest, peer, flag is null ? [] : [flag], exitCode);

    private CliResult Bfmig(string command, string guest, string peer, string[] flags, int exitCode)
    {
        string bin = WriteFakeVirsh(exitCode);
        return BfmigWith(new Dictionary<string, string> { ["PATH"] = $"{bin}:{Environment.GetEnvironmentVariable("PATH")}" },
            [command, guest, peer, .. flags]);
    }

    /// <summary>Writes the fake virsh into a directory of its own and returns that directory.</summary>
    private string WriteFakeVirsh(int exitCode)
    {
        string bin = _scratch.CreateSubdirectory("bin").FullName;
        string virsh = Path.Combine(bin, "virsh");
        File.WriteAllText(virsh, $"""
            #!/bin/sh
            printf '%s\n' "$@" > '{ArgvFile}'
            dbus-send --bus='{Bus.Address}' --print-reply --dest=org.bfmig.BFMig1 /org/bfmig/BFMig1 org.bfmig.Test.Kick > /dev/null || exit 99
            [ {exitCode} -eq 0 ] || echo 'fake virsh: error: operation failed' >&2
            exit {exitCode}

            """);
        File.SetUnixFileMode(virsh, (UnixFileMode)Convert.ToInt32("755", 8));
        return bin;
    }

    private static string RunShell(string script)
    {
        var start = new System.Diagnostics.ProcessStartInfo("/bin/sh", ["-c", script]) { RedirectStandardOutput = true };
        using var process = System.Diagnostics.Process.Start(start)!;
        string output = process.StandardOutput.ReadToEnd();
        Assert.True(process.WaitForExit(10000));
        return output;
    }

    public override void Dispose()
    {
        _scratch.Delete(recursive: true);
        base.Dispose();
    }
}
