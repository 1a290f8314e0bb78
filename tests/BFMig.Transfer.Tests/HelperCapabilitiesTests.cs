using System.Diagnostics;
using System.Globalization;
using BFMig.Native.Linux;

namespace BFMig.Transfer.Tests;

/// <summary>
/// bfmigd starts the helper as root, and the helper parses what peers send before they proved
/// anything: it keeps only the capabilities it needs, in every set, before its first byte. The
/// real helper binary reports what it is left with (<c>--capabilities</c>); the helpers the
/// other process tests start (TLS, disk) run narrowed the same way.
/// </summary>
public sealed class HelperCapabilitiesTests
{
    [Fact]
    public async Task The_helper_keeps_only_its_own_capabilities_in_its_effective_and_bounding_sets()
    {
        using var p = Process.Start(new ProcessStartInfo(Path.Combine(AppContext.BaseDirectory, "bfmig-transfer"), "--capabilities")
        {
            RedirectStandardOutput = true, RedirectStandardError = true,
        })!;
        string output = await p.StandardOutput.ReadToEndAsync();
        await p.WaitForExitAsync().WaitAsync(TimeSpan.FromSeconds(30));
        Assert.True(p.ExitCode == 0, $"exit {p.ExitCode}: {output} {await p.StandardError.ReadToEndAsync()}");
        var fields = output.Trim().Split(' ');
        ulong effective = ulong.Parse(fields[1], NumberStyles.HexNumber, CultureInfo.InvariantCulture);
        ulong bounding = ulong.Parse(fields[3], NumberStyles.HexNumber, CultureInfo.InvariantCulture);
        ulong kept = 0;
        foreach (int cap in HelperCapabilities.Kept)
            kept |= 1UL << cap;
        // The bounding set is narrowed for any user; root's effective set is the kept set exactly.
        Assert.Equal(kept & Capabilities.Bounding(), bounding);
        Assert.Equal(Environment.IsPrivilegedProcess ? kept & Capabilities.Bounding() : 0, effective);
        Assert.Equal(0UL, effective & (1UL << Capabilities.SysAdmin | 1UL << Capabilities.NetAdmin | 1UL << Capabilities.SysPtrace | 1UL << Capabilities.Setpcap));
    }
}
