using System.Globalization;
using System.Runtime.InteropServices;

namespace BFMig.Native.Linux;

/// <summary>
/// Narrows what a process started as root may do: it keeps the capabilities it names and loses
/// every other one from all of its sets (bounding, permitted, effective, inheritable, ambient),
/// and no program it runs gains privileges (no_new_privs: set-user-ID bits and file capabilities
/// are ignored). Nothing is ever added back.
/// </summary>
public static class Capabilities
{
    // linux/capability.h: the ones a caller keeps by name.
    public const int Chown = 0;
    public const int DacOverride = 1;
    public const int DacReadSearch = 2;
    public const int Fowner = 3;
    public const int Fsetid = 4;
    public const int Kill = 5;
    public const int Setgid = 6;
    public const int Setuid = 7;
    public const int Setpcap = 8;
    public const int NetAdmin = 12;
    public const int SysPtrace = 19;
    public const int SysAdmin = 21;
    public const int SysNice = 23;
    public const int SysResource = 24;

    private const int PrCapbsetRead = 23;
    private const int PrCapbsetDrop = 24;
    private const int PrSetNoNewPrivs = 38;
    private const int PrCapAmbient = 47;
    private const int PrCapAmbientClearAll = 4;
    private const uint Version3 = 0x20080522;
    private const int EInval = 22;

    /// <summary>
    /// Keeps only <paramref name="keep"/>. Returns null when done, else what failed (the process
    /// then goes on with what it had left: a caller logs it, it does not stop for it).
    /// </summary>
    public static unsafe string? KeepOnly(IReadOnlyCollection<int> keep)
    {
        ArgumentNullException.ThrowIfNull(keep);
        if (Interop.Libc.Prctl(PrSetNoNewPrivs, 1, 0, 0, 0) != 0)
            return Failure("prctl(PR_SET_NO_NEW_PRIVS)");
        // The bounding set first (it takes CAP_SETPCAP in the effective set, which goes last).
        for (int cap = 0; cap <= LastCapability(); cap++)
        {
            if (keep.Contains(cap) || Interop.Libc.Prctl(PrCapbsetRead, (nuint)cap, 0, 0, 0) != 1)
                continue;
            if (Interop.Libc.Prctl(PrCapbsetDrop, (nuint)cap, 0, 0, 0) != 0 && Marshal.GetLastPInvokeError() != EInval)
                return Failure($"prctl(PR_CAPBSET_DROP, {cap})");
        }
        if (Interop.Libc.Prctl(PrCapAmbient, PrCapAmbientClearAll, 0, 0, 0) != 0 && Marshal.GetLastPInvokeError() != EInval)
            return Failure("prctl(PR_CAP_AMBIENT_CLEAR_ALL)");
        var header = new Interop.Libc.CapHeader { Version = Version3, Pid = 0 };
        var data = stackalloc Interop.Libc.CapData[2];
        if (Interop.Libc.CapGet(&header, data) != 0)
            return Failure("capget");
        uint keepLow = 0, keepHigh = 0;
        foreach (int cap in keep)
        {
            if (cap is >= 0 and < 32)
                keepLow |= 1u << cap;
            else if (cap is >= 32 and < 64)
                keepHigh |= 1u << (cap - 32);
        }
        data[0].Effective &= keepLow;
        data[0].Permitted &= keepLow;
        data[0].Inheritable &= keepLow;
        data[1].Effective &= keepHigh;
        data[1].Permitted &= keepHigh;
        data[1].Inheritable &= keepHigh;
        header = new Interop.Libc.CapHeader { Version = Version3, Pid = 0 };
        return Interop.Libc.CapSet(&header, data) == 0 ? null : Failure("capset");
    }

    /// <summary>This process's effective capabilities, as the kernel reports them (<c>CapEff</c> in /proc/self/status).</summary>
    public static ulong Effective() => StatusMask("CapEff:");

    /// <summary>This process's bounding set (<c>CapBnd</c>).</summary>
    public static ulong Bounding() => StatusMask("CapBnd:");

    private static ulong StatusMask(string field)
    {
        foreach (var line in File.ReadLines("/proc/self/status"))
        {
            if (line.StartsWith(field, StringComparison.Ordinal))
                return ulong.Parse(line.AsSpan(field.Length).Trim(), NumberStyles.HexNumber, CultureInfo.InvariantCulture);
        }
        throw new IOException($"/proc/self/status has no {field}");
    }

    // The highest capability this kernel knows (it may know more than this code names).
    private static int LastCapability()
    {
        try
        {
            return int.Parse(File.ReadAllText("/proc/sys/kernel/cap_last_cap").Trim(), CultureInfo.InvariantCulture);
        }
        catch (Exception e) when (e is IOException or FormatException or UnauthorizedAccessException)
        {
            return 63;
        }
    }

    private static string Failure(string call)
    {
        int errno = Marshal.GetLastPInvokeError();
        return $"{call} failed: {Marshal.GetPInvokeErrorMessage(errno)} (errno {errno})";
    }
}
