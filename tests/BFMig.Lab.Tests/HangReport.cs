using System.Diagnostics;
using System.Globalization;
using System.Text;

namespace BFMig.Lab.Tests;

/// <summary>
/// What a lab command that outlived its limit was doing: its last lines of output and the
/// processes under it that were still running (the leaves of its process tree, where a hang
/// sits), so that a hang in CI names its place instead of only its test.
/// </summary>
internal static class HangReport
{
    private const int OutputLines = 4;
    private const int LeafLines = 4;
    private const int LineWidth = 180;

    /// <summary>One process under the hung command: its id, how long it had run, its command line.</summary>
    public sealed record Stuck(int Pid, long Seconds, string CommandLine);

    /// <summary>
    /// The leaf processes under <paramref name="root"/> in its session, longest-running last. The
    /// lab's services (libvirtd, virtlogd: started with setsid, in sessions of their own) stay
    /// children of the lab's shell and would otherwise be the oldest leaves of any command that
    /// starts them, pushing out the stuck one.
    /// </summary>
    public static IReadOnlyList<Stuck> StillRunning(int root)
    {
        var leaves = new List<Stuck>();
        var seen = new HashSet<int>();
        var pending = new Stack<int>();
        var session = Read(root)?.Session;
        pending.Push(root);
        // Bounded: a fork bomb under the lab must not make the report itself hang.
        while (pending.Count > 0 && seen.Count < 4096)
        {
            var pid = pending.Pop();
            if (!seen.Add(pid))
            {
                continue;
            }

            var children = Children(pid);
            foreach (var child in children)
            {
                pending.Push(child);
            }

            if (children.Count == 0 && pid != root && Read(pid) is { } p && p.Session == session)
            {
                leaves.Add(p.Stuck);
            }
        }

        return [.. leaves.OrderBy(s => s.Seconds)];
    }

    /// <summary>
    /// <c>lab status --jobs</c> of <paramref name="labName"/>: the guest's migration job and QEMU
    /// log line on each host (a hung <c>virsh migrate</c> says little by itself). Bounded to 30 s;
    /// what went wrong asking is the answer then.
    /// </summary>
    public static IReadOnlyList<string> MigrationJobs(string labScript, string labName)
    {
        try
        {
            var psi = new ProcessStartInfo(labScript, ["status", "--jobs"])
            {
                RedirectStandardOutput = true,
                RedirectStandardError = true,
                UseShellExecute = false,
            };
            psi.Environment["BFMIG_LAB_NAME"] = labName;
            using var p = Process.Start(psi)!;
            var stdout = p.StandardOutput.ReadToEndAsync();
            var stderr = p.StandardError.ReadToEndAsync();
            if (!p.WaitForExit(TimeSpan.FromSeconds(30)))
            {
                p.Kill(entireProcessTree: true);
                return ["lab status --jobs did not answer within 30 s"];
            }
            return [.. (stdout.Result + stderr.Result).Split('\n', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries).TakeLast(6)];
        }
        catch (Exception e) when (e is InvalidOperationException or System.ComponentModel.Win32Exception or IOException)
        {
            return [$"lab status --jobs failed: {e.Message}"];
        }
    }

    /// <summary>The report's text: the last lines of output, then the leaves (the oldest last), then the migration jobs.</summary>
    public static string Describe(string output, IReadOnlyList<Stuck> stuck, IReadOnlyList<string>? jobs = null)
    {
        var text = new StringBuilder();
        var lines = output.Split('\n', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
        text.Append("last output:");
        foreach (var line in lines.TakeLast(OutputLines))
        {
            text.Append('\n').Append("  ").Append(Cut(line));
        }

        text.Append('\n').Append(CultureInfo.InvariantCulture, $"still running ({stuck.Count} leaf processes; the longest-running last):");
        foreach (var s in stuck.TakeLast(LeafLines))
        {
            text.Append('\n').Append(CultureInfo.InvariantCulture, $"  [{s.Pid}, {s.Seconds} s] {Cut(s.CommandLine)}");
        }

        if (jobs is { Count: > 0 })
        {
            text.Append('\n').Append("migration jobs:");
            foreach (var line in jobs)
            {
                text.Append('\n').Append("  ").Append(Cut(line));
            }
        }

        return text.ToString();
    }

    // Each thread's children file on its own: a thread that ends mid-walk loses only its own.
    private static List<int> Children(int pid)
    {
        var children = new List<int>();
        string[] tasks;
        try
        {
            tasks = Directory.GetDirectories($"/proc/{pid}/task");
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            return children;
        }

        foreach (var task in tasks)
        {
            try
            {
                foreach (var word in File.ReadAllText(Path.Combine(task, "children")).Split(' ', StringSplitOptions.RemoveEmptyEntries))
                {
                    if (int.TryParse(word, NumberStyles.None, CultureInfo.InvariantCulture, out var child))
                    {
                        children.Add(child);
                    }
                }
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException)
            {
                // Gone meanwhile: no children to report.
            }
        }

        return children;
    }

    // A process as /proc shows it, or null when it is gone or unreadable: nothing read here may
    // throw, or the caller's kill of the hung tree would be skipped.
    private static (Stuck Stuck, long Session)? Read(int pid)
    {
        try
        {
            var commandLine = File.ReadAllText($"/proc/{pid}/cmdline").Replace('\0', ' ').Trim();
            // The command name in field 2 may hold spaces and parentheses, so count from the
            // last ')': field 6 is the session, field 22 the start time in clock ticks
            // (USER_HZ, 100 on Linux) since boot.
            var stat = File.ReadAllText($"/proc/{pid}/stat");
            int open = stat.IndexOf('(', StringComparison.Ordinal), close = stat.LastIndexOf(')');
            var fields = stat[(close + 2)..].Split(' ');
            var session = long.Parse(fields[3], CultureInfo.InvariantCulture);
            var startTicks = long.Parse(fields[19], CultureInfo.InvariantCulture);
            var uptime = double.Parse(File.ReadAllText("/proc/uptime").Split(' ')[0], CultureInfo.InvariantCulture);
            var seconds = (long)(uptime - (startTicks / 100.0));
            var name = stat[(open + 1)..close];
            return (new Stuck(pid, seconds, commandLine.Length > 0 ? commandLine : $"[{name}]"), session);
        }
        catch (Exception e) when (e is not OutOfMemoryException)
        {
            return null;
        }
    }

    private static string Cut(string line) => line.Length > LineWidth ? line[..LineWidth] + "..." : line;
}
