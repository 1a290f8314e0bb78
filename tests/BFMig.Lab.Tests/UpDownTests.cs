using System.Text.RegularExpressions;
using Xunit;
using Xunit.Abstractions;

namespace BFMig.Lab.Tests;

/// <summary><c>lab up</c> / <c>lab down</c>: idempotent, two distinct hosts, and nothing left behind.</summary>
[Collection(LabCollection.Name)]
public sealed partial class UpDownTests(ITestOutputHelper output)
{
    private static readonly string RunDir = $"/run/{LabRunner.LabName}";
    private static readonly string VarDir = $"/var/tmp/{LabRunner.LabName}";
    private static readonly string[] Hosts = ["a", "b"];

    private readonly LabRunner lab = new(output);

    [LabFact]
    public void UpTwice_DownTwice_LeavesNoTrace()
    {
        lab.Run(TimeSpan.FromMinutes(2), "down");
        lab.Run(TimeSpan.FromMinutes(2), "down");
        AssertNoTrace([]);

        lab.Run(TimeSpan.FromMinutes(10), "up", "--rate", "1gbit");
        var pids = ReadPids();
        Assert.Equal(4, pids.Count);
        Assert.All(pids, pid => Assert.True(Directory.Exists($"/proc/{pid}"), $"pid {pid} is not running"));
        Assert.All(Hosts, h => Assert.True(File.Exists($"/run/netns/{LabRunner.LabName}-{h}"), $"netns of host {h} missing"));

        // Again, with the shared storage's namespace: the hosts stay, both route the storage
        // address over their own link to it (st-s), not over the WAN.
        lab.Run(TimeSpan.FromMinutes(2), "up", "--storage", "shared");
        Assert.Equal(pids, ReadPids());
        Assert.True(File.Exists($"/run/netns/{LabRunner.LabName}-s"), "netns of the shared storage missing");
        Assert.All(Hosts, h => Assert.Contains("dev st-s", lab.Run(TimeSpan.FromMinutes(1), "exec", h, "ip", "route", "get", "198.18.0.9"), StringComparison.Ordinal));
        Assert.Contains("up: stack", lab.Run(TimeSpan.FromMinutes(1), "status"), StringComparison.Ordinal);

        // Two hosts as libvirt sees them: different host UUIDs; B's libvirtd reachable from A over the veth.
        var uuidA = HostUuid(lab.Run(TimeSpan.FromMinutes(1), "virsh", "a", "capabilities"));
        var uuidB = HostUuid(lab.Run(TimeSpan.FromMinutes(1), "virsh", "b", "capabilities"));
        Assert.NotEqual(uuidA, uuidB);
        lab.Run(TimeSpan.FromMinutes(1), "exec", "a", "timeout", "10", "bash", "-c", "exec 3<>/dev/tcp/198.18.0.2/16509");

        lab.Run(TimeSpan.FromMinutes(2), "down");
        AssertNoTrace(pids);
        lab.Run(TimeSpan.FromMinutes(2), "down");
    }

    /// <summary>
    /// <c>up --hosts 3</c>: host C behind the switch namespace, reachable from A; <c>up --hosts 2</c>
    /// rebuilds the two-host lab (no C, no switch); <c>down</c> leaves nothing of either.
    /// </summary>
    [LabFact]
    public void ThreeHosts_UpThenBackToTwo_LeavesNoTrace()
    {
        lab.Run(TimeSpan.FromMinutes(2), "down");
        lab.Run(TimeSpan.FromMinutes(10), "up", "--hosts", "3", "--rate", "1gbit");
        var pids = ReadPids(["a", "b", "c"]);
        Assert.Equal(6, pids.Count);
        Assert.All(["c", "sw"], n => Assert.True(File.Exists($"/run/netns/{LabRunner.LabName}-{n}"), $"netns {n} missing"));
        Assert.Contains("host c (198.18.0.3)", lab.Run(TimeSpan.FromMinutes(1), "status"), StringComparison.Ordinal);
        var uuids = new[] { "a", "b", "c" }.Select(h => HostUuid(lab.Run(TimeSpan.FromMinutes(1), "virsh", h, "capabilities"))).ToList();
        Assert.Equal(3, uuids.Distinct().Count());
        lab.Run(TimeSpan.FromMinutes(1), "exec", "a", "timeout", "10", "bash", "-c", "exec 3<>/dev/tcp/198.18.0.3/16509");
        lab.Run(TimeSpan.FromMinutes(1), "exec", "c", "timeout", "10", "bash", "-c", "exec 3<>/dev/tcp/198.18.0.2/16509");

        lab.Run(TimeSpan.FromMinutes(10), "up", "--hosts", "2");
        Assert.All(["c", "sw"], n => Assert.False(File.Exists($"/run/netns/{LabRunner.LabName}-{n}"), $"netns {n} left in the two-host lab"));
        Assert.All(pids, pid => Assert.False(Directory.Exists($"/proc/{pid}"), $"pid {pid} of the three-host lab still running"));
        Assert.Equal(4, ReadPids(Hosts).Count);
        lab.Run(TimeSpan.FromMinutes(2), "down");
        AssertNoTrace([]);
    }

    private static List<int> ReadPids() => ReadPids(Hosts);

    private static List<int> ReadPids(IEnumerable<string> hosts) =>
        [.. hosts.SelectMany(h => new[] { "libvirtd", "virtlogd" }.Select(d => $"{RunDir}/{h}.{d}.pid"))
            .Where(File.Exists)
            .Select(f => int.Parse(File.ReadAllText(f).Trim(), System.Globalization.CultureInfo.InvariantCulture))];

    private static string HostUuid(string capabilities)
    {
        var match = UuidPattern().Match(capabilities);
        Assert.True(match.Success, "no <uuid> in capabilities");
        return match.Groups[1].Value;
    }

    private static void AssertNoTrace(IReadOnlyList<int> formerPids)
    {
        Assert.All([.. Hosts, "c", "sw", "s"], h => Assert.False(File.Exists($"/run/netns/{LabRunner.LabName}-{h}"), $"netns {h} left behind"));
        var mounts = File.ReadAllLines("/proc/self/mountinfo").Where(l => l.Contains(LabRunner.LabName, StringComparison.Ordinal)).ToList();
        Assert.True(mounts.Count == 0, "mounts left behind:\n" + string.Join('\n', mounts));
        Assert.False(Directory.Exists(RunDir), $"{RunDir} left behind");
        Assert.False(Directory.Exists(VarDir), $"{VarDir} left behind");
        Assert.All(formerPids, pid => Assert.False(Directory.Exists($"/proc/{pid}"), $"pid {pid} still running"));
        // Only this lab's QEMUs: another checkout's lab may run on the same machine (its hosts'
        // libvirt directories are bind mounts from its own /var/tmp/NAME/, seen in mountinfo).
        var ours = $" {VarDir}/";
        var guests = Directory.EnumerateDirectories("/proc")
            .Where(d => int.TryParse(Path.GetFileName(d), out _))
            .Where(d => ReadProcFile(d, "cmdline").Contains("guest=lab-guest", StringComparison.Ordinal))
            .Where(d => ReadProcFile(d, "mountinfo").Contains(ours, StringComparison.Ordinal))
            .ToList();
        Assert.True(guests.Count == 0, "lab QEMU still running: " + string.Join(' ', guests));
    }

    private static string ReadProcFile(string procDir, string name)
    {
        try
        {
            return File.ReadAllText(Path.Combine(procDir, name));
        }
        catch (IOException)
        {
            return "";
        }
        catch (UnauthorizedAccessException)
        {
            return "";
        }
    }

    [GeneratedRegex("<host>\\s*<uuid>([0-9a-f-]+)</uuid>")]
    private static partial Regex UuidPattern();
}
