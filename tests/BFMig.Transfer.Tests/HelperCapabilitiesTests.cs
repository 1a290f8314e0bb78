using System.Diagnostics;
using System.Globalization;
using BFMig.Native.Linux;

namespace BFMig.Transfer.Tests;

/// <summary>
/// bfmigd starts the helper as root, and the helper parses what peers send before they proved
/// anything: it keeps only the capabilities it needs, on every thread, before its first byte.
/// The real helper binary reports what it is left with (<c>--capabilities</c>: the effective
/// sets of all its threads together, and its bounding set); the helpers the other process tests
/// start (TLS, disk) run narrowed the same way.
/// </summary>
public sealed class HelperCapabilitiesTests
{
    private static readonly string Helper = Path.Combine(AppContext.BaseDirectory, "bfmig-transfer");

    private static ulong Kept => HelperCapabilities.Mask;

    [Fact]
    public async Task Every_thread_of_the_helper_keeps_only_its_own_capabilities_and_so_does_its_bounding_set()
    {
        var (effective, bounding, note) = await CapabilitiesOfAsync(Helper, "--capabilities");
        ulong mine = Capabilities.Bounding();
        Assert.Equal(Environment.IsPrivilegedProcess ? Kept & mine : 0, effective);
        if (Environment.IsPrivilegedProcess)
        {
            Assert.Equal(Kept & mine, bounding);
            Assert.Equal("", note);
        }
        Assert.Equal(0UL, effective & (1UL << Capabilities.SysAdmin | 1UL << Capabilities.NetAdmin | 1UL << Capabilities.SysPtrace | 1UL << Capabilities.Setpcap));
    }

    /// <summary>
    /// Whether the helper is narrowed is read from its own thread, never from what its starter
    /// says: started with no_new_privs already set (and every capability), and with the
    /// environment mark an earlier version trusted, it narrows itself all the same.
    /// </summary>
    [Fact]
    public async Task Nothing_its_starter_sets_makes_the_helper_skip_the_narrowing()
    {
        if (!Environment.IsPrivilegedProcess)
            Assert.Fail("needs root: capabilities to narrow");
        var (effective, bounding, note) = await CapabilitiesOfAsync("/usr/bin/setpriv", "--no-new-privs", "--",
            "/usr/bin/env", "BFMIG_TRANSFER_NARROWED=", Helper, "--capabilities");
        Assert.Equal(Kept & Capabilities.Bounding(), effective);
        Assert.Equal(Kept & Capabilities.Bounding(), bounding);
        Assert.Equal("", note);
    }

    /// <summary>
    /// Where bfmigd lacks CAP_SETPCAP (a unit's bounding set without it) the bounding set cannot
    /// shrink, and the helper says so; its threads' capabilities are narrowed all the same.
    /// </summary>
    [Fact]
    public async Task Without_CAP_SETPCAP_the_effective_sets_are_narrowed_all_the_same()
    {
        if (!Environment.IsPrivilegedProcess)
            Assert.Fail("needs root: a bounding set to narrow");
        var (effective, bounding, note) = await CapabilitiesOfAsync("/usr/bin/setpriv", "--bounding-set=-setpcap", "--", Helper, "--capabilities");
        Assert.Equal(Kept & Capabilities.Bounding(), effective);
        Assert.Equal(0UL, bounding & (1UL << Capabilities.Setpcap));
        Assert.NotEqual(Kept & Capabilities.Bounding(), bounding); // left as it was, but for CAP_SETPCAP
        Assert.Contains("bounding set", note);
    }

    /// <summary>
    /// The packaged unit lets bfmigd pass on every capability the helper keeps (else qemu-nbd's
    /// setpriv fails under systemd), and CAP_SETPCAP, so that each helper can narrow its bounding set.
    /// </summary>
    [Fact]
    public void The_systemd_unit_allows_every_capability_the_helper_keeps_and_the_narrowing()
    {
        var unit = File.ReadAllLines(Path.Combine(RepositoryRoot(), "packaging", "common", "bfmigd.service"));
        var allowed = unit.Single(l => l.StartsWith("CapabilityBoundingSet=", StringComparison.Ordinal))["CapabilityBoundingSet=".Length..].Split(' ');
        string[] names = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP"];
        foreach (int cap in HelperCapabilities.Kept.Append(Capabilities.Setpcap))
            Assert.Contains(names[cap], allowed);
    }

    // The first directory above the test binaries holding BFMig.sln.
    private static string RepositoryRoot()
    {
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
        {
            if (File.Exists(Path.Combine(dir.FullName, "BFMig.sln")))
                return dir.FullName;
        }
        throw new InvalidOperationException($"no BFMig.sln above {AppContext.BaseDirectory}");
    }

    private static async Task<(ulong Effective, ulong Bounding, string Note)> CapabilitiesOfAsync(string file, params string[] args)
    {
        var start = new ProcessStartInfo(file) { RedirectStandardOutput = true, RedirectStandardError = true };
        foreach (var a in args)
            start.ArgumentList.Add(a);
        using var p = Process.Start(start)!;
        string output = await p.StandardOutput.ReadToEndAsync();
        await p.WaitForExitAsync().WaitAsync(TimeSpan.FromSeconds(30));
        Assert.True(p.ExitCode == 0, $"exit {p.ExitCode}: {output} {await p.StandardError.ReadToEndAsync()}");
        // "effective HEX bounding HEX[ (not done: ...)]"
        var fields = output.Trim().Split(' ', 5);
        return (ulong.Parse(fields[1], NumberStyles.HexNumber, CultureInfo.InvariantCulture),
            ulong.Parse(fields[3], NumberStyles.HexNumber, CultureInfo.InvariantCulture), fields.Length > 4 ? fields[4] : "");
    }
}
