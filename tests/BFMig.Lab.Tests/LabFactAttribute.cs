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

/// <summary>A lab integration test with data rows; skips and fails like <see cref="LabFactAttribute"/>.</summary>
[AttributeUsage(AttributeTargets.Method)]
public sealed class LabTheoryAttribute : TheoryAttribute
{
    /// <summary>Sets <see cref="FactAttribute.Skip"/> when the lab cannot run here and CI is not set.</summary>
    public LabTheoryAttribute()
    {
        Skip = new LabFactAttribute().Skip;
    }
}

/// <summary>
/// A long lab case: runs where a <see cref="LabFactAttribute"/> runs, except under CI=true (CI's
/// budget holds the representative handful), unless BFMIG_LAB_LONG=1 asks for it there too.
/// </summary>
[AttributeUsage(AttributeTargets.Method)]
public sealed class LongLabFactAttribute : FactAttribute
{
    private const string Generic = "long lab case (several minutes), kept out of CI's budget; CI runs a shorter case of the same class";

    /// <summary>Skips with the reason (seen in the test output) under CI or without root.</summary>
    public LongLabFactAttribute()
    {
        Skip = new LabFactAttribute().Skip;
        if (Skip is null && OutOfCi)
            Skip = Generic + Hint;
    }

    /// <summary>Why this case stays out of CI, when it is not only its length (printed as the skip reason instead).</summary>
    public string? Why
    {
        get => _why;
        init
        {
            _why = value;
            if (Skip == Generic + Hint)
                Skip = value + Hint;
        }
    }

    private readonly string? _why;

    private const string Hint = "; set BFMIG_LAB_LONG=1 to run it under CI";

    private static bool OutOfCi =>
        string.Equals(Environment.GetEnvironmentVariable("CI"), "true", StringComparison.OrdinalIgnoreCase)
        && Environment.GetEnvironmentVariable("BFMIG_LAB_LONG") != "1";
}

/// <summary>One lab at a time: every lab test belongs to this collection, which never runs in parallel.</summary>
[CollectionDefinition(Name, DisableParallelization = true)]
public sealed class LabCollection : ICollectionFixture<LabLease>
{
    /// <summary>Collection name used by <see cref="CollectionAttribute"/> on lab test classes.</summary>
    public const string Name = "lab";
}

/// <summary>
/// Holds the lab's lock (<c>/run/bfmig-lab.lock</c>, or that of <c>BFMIG_LAB_NAME</c>: the one <c>lab/lab</c> takes) for
/// the whole collection, so another checkout's lab commands wait instead of tearing down the
/// hosts under these tests; takes the lab down after the last test.
/// </summary>
public sealed class LabLease : IDisposable
{
    private static readonly TimeSpan LockWait = TimeSpan.FromMinutes(30);
    private readonly FileStream? lockFile;

    /// <summary>Waits for the lab lock (when the lab can run here at all).</summary>
    public LabLease()
    {
        if (Environment.UserName != "root")
        {
            return;
        }

        var deadline = DateTime.UtcNow + LockWait;
        while (true)
        {
            try
            {
                // FileShare.None is an exclusive flock(2) on Linux: the same lock flock(1) takes in lab/lab.
                lockFile = new FileStream(LabRunner.LockPath, FileMode.OpenOrCreate, FileAccess.ReadWrite, FileShare.None);
                break;
            }
            catch (IOException) when (DateTime.UtcNow < deadline)
            {
                Thread.Sleep(TimeSpan.FromSeconds(2));
            }
        }
    }

    /// <summary>True when this process holds the lab lock; lab commands then must not take it again.</summary>
    public bool HoldsLock => lockFile is not null;

    /// <inheritdoc/>
    public void Dispose()
    {
        try
        {
            if (lockFile is not null && File.Exists(LabRunner.LabScript))
            {
                var psi = new System.Diagnostics.ProcessStartInfo(LabRunner.LabScript, "down");
                psi.Environment["BFMIG_LAB_LOCK_HELD"] = "1";
                psi.Environment["BFMIG_LAB_NAME"] = LabRunner.LabName;
                using var process = System.Diagnostics.Process.Start(psi)!;
                if (!process.WaitForExit(TimeSpan.FromMinutes(2)))
                {
                    process.Kill(entireProcessTree: true);
                }
            }
        }
        finally
        {
            lockFile?.Dispose();
        }
    }
}
