using Xunit;

namespace BFMig.Lab.Tests;

/// <summary>
/// A lab integration test. It needs root (namespaces, mounts, libvirtd). Outside CI a
/// non-root run skips with the reason; with CI=true it always runs, so a missing
/// prerequisite fails instead of hiding.
/// </summary>
[AttributeUsage(AttributeTargets.Method)]
public sealed class LabFactAttribute : FactAttribute
{
    /// <summary>Sets <see cref="FactAttribute.Skip"/> when the lab cannot run here and CI is not set.</summary>
    public LabFactAttribute()
    {
        var ci = string.Equals(Environment.GetEnvironmentVariable("CI"), "true", StringComparison.OrdinalIgnoreCase);
        if (!ci && Environment.UserName != "root")
        {
            Skip = "the lab needs root (network/mount namespaces, libvirtd); run as root or with CI=true";
        }
    }
}

/// <summary>One lab at a time: every lab test belongs to this collection, which never runs in parallel.</summary>
[CollectionDefinition(Name, DisableParallelization = true)]
public sealed class LabCollection : ICollectionFixture<LabTeardown>
{
    /// <summary>Collection name used by <see cref="CollectionAttribute"/> on lab test classes.</summary>
    public const string Name = "lab";
}

/// <summary>Takes the lab down after the last lab test, whatever happened in between.</summary>
public sealed class LabTeardown : IDisposable
{
    /// <inheritdoc/>
    public void Dispose()
    {
        if (Environment.UserName != "root" || !File.Exists(LabRunner.LabScript))
        {
            return;
        }

        using var process = System.Diagnostics.Process.Start(LabRunner.LabScript, "down");
        if (!process.WaitForExit(TimeSpan.FromMinutes(2)))
        {
            process.Kill(entireProcessTree: true);
        }
    }
}
