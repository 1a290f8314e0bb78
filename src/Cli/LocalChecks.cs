using BFMig.Native.Libvirt;

namespace BFMig.Cli;

/// <summary>
/// What doctor can check without the daemon. Paths and the libvirt URI default to a real host's
/// and can be pointed elsewhere (tests, the lab's namespaced hosts) with BFMIG_HOOK_PATH,
/// BFMIG_RUN_DIR and BFMIG_LIBVIRT_URI.
/// </summary>
internal static class LocalChecks
{
    public const string DefaultHookPath = "/etc/libvirt/hooks/qemu.d/50-bfmig";
    public const string DefaultRunDirectory = "/run/bfmig";
    public const string DefaultLibvirtUri = "qemu:///system";

    public static IReadOnlyList<DoctorCheck> Run() =>
    [
        Hook(Setting("BFMIG_HOOK_PATH", DefaultHookPath)),
        RunDirectory(Setting("BFMIG_RUN_DIR", DefaultRunDirectory)),
        Libvirt(Setting("BFMIG_LIBVIRT_URI", DefaultLibvirtUri)),
    ];

    private static string Setting(string variable, string fallback) =>
        Environment.GetEnvironmentVariable(variable) is { Length: > 0 } value ? value : fallback;

    public static DoctorCheck Hook(string path)
    {
        const string name = "hook";
        var file = new FileInfo(path);
        if (!file.Exists)
        {
            return new DoctorCheck(name, false, Directory.Exists(path)
                ? $"{path} is a directory, not the hook executable"
                : $"{path} is missing: libvirt will not tell BFMig about guests (reinstall the bfmig package)");
        }
        UnixFileMode mode = file.UnixFileMode;
        const UnixFileMode anyExecute = UnixFileMode.UserExecute | UnixFileMode.GroupExecute | UnixFileMode.OtherExecute;
        return (mode & UnixFileMode.UserExecute) != 0
            ? new DoctorCheck(name, true, $"{path} present and executable (mode {Octal(mode)})")
            : new DoctorCheck(name, false, $"{path} is not executable (mode {Octal(mode)}): libvirt skips it; run chmod 755 {path}"
                + ((mode & anyExecute) != 0 ? " (only group/other may execute it; libvirt runs hooks as root)" : ""));
    }

    public static DoctorCheck RunDirectory(string path)
    {
        const string name = "run-directory";
        if (!Directory.Exists(path))
        {
            return new DoctorCheck(name, false, File.Exists(path)
                ? $"{path} is a file, not a directory"
                : $"{path} is missing: bfmigd creates it at start (systemd RuntimeDirectory)");
        }
        UnixFileMode mode = new DirectoryInfo(path).UnixFileMode;
        if ((mode & UnixFileMode.OtherWrite) != 0 && (mode & UnixFileMode.StickyBit) == 0)
        {
            return new DoctorCheck(name, false, $"{path} is world-writable (mode {Octal(mode)}): anyone could plant a migration socket; chmod o-w {path}");
        }
        if ((mode & UnixFileMode.GroupWrite) != 0)
        {
            return new DoctorCheck(name, false, $"{path} is group-writable (mode {Octal(mode)}): only bfmigd should create sockets there; chmod g-w {path}");
        }
        if ((mode & (UnixFileMode.OtherExecute | UnixFileMode.GroupExecute)) == 0)
        {
            return new DoctorCheck(name, false, $"{path} (mode {Octal(mode)}) cannot be traversed by the QEMU user, who must connect to the sockets inside");
        }
        return new DoctorCheck(name, true, $"{path} exists with mode {Octal(mode)}");
    }

    public static DoctorCheck Libvirt(string uri)
    {
        const string name = "libvirt";
        try
        {
            using LibvirtConnection connection = LibvirtConnection.Open(uri, readOnly: true);
            ulong v = connection.LibVersion;
            return new DoctorCheck(name, true, $"{uri} reachable (libvirt {v / 1000000}.{v / 1000 % 1000}.{v % 1000} on {connection.Hostname})");
        }
        catch (LibvirtException e)
        {
            return new DoctorCheck(name, false, $"{uri} not reachable: {e.LibvirtMessage}");
        }
        catch (DllNotFoundException e)
        {
            return new DoctorCheck(name, false, $"libvirt library not loadable: {e.Message}");
        }
    }

    private static string Octal(UnixFileMode mode) => Convert.ToString((int)mode & 0xfff, 8).PadLeft(4, '0');
}
