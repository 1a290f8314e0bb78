using BFMig.Native.Linux;

namespace BFMig.Transfer;

/// <summary>What bfmig-transfer keeps of root's capabilities (<see cref="Capabilities.KeepOnly"/>, before its first byte).</summary>
public static class HelperCapabilities
{
    /// <summary>
    /// Files of other users (the QEMU user's images and block devices, and the stores), and
    /// starting qemu-nbd as the QEMU user (setpriv) and stopping it. Not, among others,
    /// CAP_SYS_ADMIN, CAP_NET_ADMIN, CAP_SYS_PTRACE or CAP_SETPCAP.
    /// </summary>
    public static IReadOnlyList<int> Kept { get; } =
    [
        Capabilities.Chown, Capabilities.DacOverride, Capabilities.DacReadSearch, Capabilities.Fowner, Capabilities.Fsetid,
        Capabilities.Kill, Capabilities.Setgid, Capabilities.Setuid, Capabilities.SysNice, Capabilities.SysResource,
    ];
}
