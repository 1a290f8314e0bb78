namespace BFMig.Native;

/// <summary>Version string shared by every BFMig binary (printed by --version).</summary>
public static class BuildInfo
{
    public const string Version = "0.1.0";
}
