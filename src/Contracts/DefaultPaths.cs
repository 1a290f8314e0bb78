namespace BFMig.Contracts;

/// <summary>
/// Where an installed BFMig keeps things. The daemon may be configured elsewhere (bfmig.conf); the
/// hook, which libvirt runs with a minimal environment, uses these unless a test overrides them.
/// </summary>
public static class DefaultPaths
{
    /// <summary>The daemon's configuration file.</summary>
    public const string ConfigFile = "/etc/bfmig/bfmig.conf";

    /// <summary>Per-guest state: <c>STATE/UUID/location.json</c> (<see cref="LocationRecord"/>), <c>mem/</c>, <c>disk/</c>.</summary>
    public const string StateDirectory = "/var/lib/bfmig";

    /// <summary>Sockets and the hook's incoming-migration markers (<c>RUN/incoming/UUID</c>).</summary>
    public const string RuntimeDirectory = "/run/bfmig";

    /// <summary>The transfer helper the daemon runs, one per stream.</summary>
    public const string TransferHelper = "/usr/libexec/bfmig/bfmig-transfer";

    /// <summary><c>STATE/UUID/location.json</c>: where the guest runs, written by bfmigd only.</summary>
    public static string LocationFile(string stateDirectory, Guid uuid) => Path.Combine(stateDirectory, uuid.ToString("D"), LocationRecord.FileName);

    /// <summary><c>RUN/incoming/UUID</c>: the hook's note that an incoming migration of the guest was announced.</summary>
    public static string IncomingMarker(string runtimeDirectory, Guid uuid) => Path.Combine(runtimeDirectory, "incoming", uuid.ToString("D"));
}
