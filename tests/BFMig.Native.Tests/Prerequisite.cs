using Xunit.Abstractions;

namespace BFMig.Native.Tests;

/// <summary>
/// Tests that need something this machine may lack (a libvirtd, journald) call <see cref="Require"/>:
/// under CI=true a missing prerequisite fails the test; locally the test prints why and returns.
/// </summary>
internal static class Prerequisite
{
    public static bool IsCi => string.Equals(Environment.GetEnvironmentVariable("CI"), "true", StringComparison.OrdinalIgnoreCase);

    public static bool Require(bool present, string what, ITestOutputHelper output)
    {
        if (present)
        {
            return true;
        }
        if (IsCi)
        {
            Assert.Fail($"prerequisite missing (CI=true, so this fails): {what}");
        }
        output.WriteLine($"SKIPPED: prerequisite missing: {what}");
        return false;
    }
}
