using BFMig.Contracts;

namespace BFMig.Hooks;

/// <summary>
/// Where the hook looks. Production uses the defaults; the environment variables exist for tests
/// and labs (libvirt runs hooks with a minimal environment, so they are normally unset). Clock is the
/// split-brain rule's clock (tests use a fake one; null: the system's).
/// </summary>
internal sealed record HookSettings(string StateDirectory, string RunDirectory, string? BusAddress, TimeSpan DaemonTimeout, TimeProvider? Clock = null)
{
    public const string DefaultStateDirectory = DefaultPaths.StateDirectory;
    public const string DefaultRunDirectory = DefaultPaths.RuntimeDirectory;

    /// <summary>Now, by <see cref="Clock"/>.</summary>
    public DateTimeOffset Now => (Clock ?? TimeProvider.System).GetUtcNow();

    /// <summary>Long enough for a busy daemon, short enough that libvirt barely notices a hung one.</summary>
    public static readonly TimeSpan DefaultDaemonTimeout = TimeSpan.FromSeconds(2);

    public static HookSettings FromEnvironment() => new(
        Environment.GetEnvironmentVariable("BFMIG_STATE_DIR") ?? DefaultStateDirectory,
        Environment.GetEnvironmentVariable("BFMIG_RUN_DIR") ?? DefaultRunDirectory,
        Environment.GetEnvironmentVariable(BusContract.BusAddressVariable),
        DefaultDaemonTimeout);
}
