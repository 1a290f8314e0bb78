using BFMig.Native.Linux;

namespace BFMig.Transfer;

/// <summary>What bfmig-transfer keeps of root's capabilities (<see cref="Capabilities.KeepOnly"/>, before its first byte).</summary>
public static class HelperCapabilities
{
    /// <summary>
    /// Files of other users (DAC_OVERRIDE, DAC_READ_SEARCH: the QEMU user's images, block devices
    /// and directories; CHOWN, FOWNER: qemu-nbd's private directory), starting qemu-nbd as the
    /// QEMU user through setpriv (SETUID, SETGID) and stopping it (KILL). Not, among others,
    /// CAP_SYS_ADMIN, CAP_NET_ADMIN, CAP_SYS_PTRACE, CAP_SYS_RESOURCE or CAP_SETPCAP. bfmigd's
    /// systemd unit must allow each of these (packaging/common/bfmigd.service, CapabilityBoundingSet).
    /// </summary>
    public static IReadOnlyList<int> Kept { get; } =
    [
        Capabilities.Chown, Capabilities.DacOverride, Capabilities.DacReadSearch, Capabilities.Fowner,
        Capabilities.Kill, Capabilities.Setgid, Capabilities.Setuid,
    ];

    /// <summary><see cref="Kept"/> as a capability mask (bit n: capability n).</summary>
    public static ulong Mask { get; } = Kept.Aggregate(0UL, (mask, cap) => mask | 1UL << cap);
}
