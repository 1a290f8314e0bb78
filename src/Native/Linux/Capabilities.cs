using System.Globalization;
using System.Runtime.InteropServices;
using BFMig.Native.Processes;

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
    public const int Kill = 5;
    public const int Setgid = 6;
    public const int Setuid = 7;
    public const int Setpcap = 8;
    public const int NetAdmin = 12;
    public const int SysPtrace = 19;
    public const int SysAdmin = 21;
    public const int SysResource = 24;

    private const int PrCapbsetRead = 23;
    private const int PrCapbsetDrop = 24;
    private const int PrSetNoNewPrivs = 38;
    private const int PrCapAmbient = 47;
    private const int PrCapAmbientClearAll = 4;
    private const uint Version3 = 0x20080522;
    private const int EInval = 22;

    /// <summary>
    /// Keeps only <paramref name="keep"/> on the calling thread, and sets no_new_privs. Returns
    /// null when all of it was done, else what was not (the caller logs it and goes on: a
    /// helper that could not narrow itself still carries its stream). Without CAP_SETPCAP (a
    /// systemd unit's bounding set may lack it) the bounding set stays as it was; the permitted
    /// set is narrowed all the same, and with no_new_privs no exec can widen it again.
    /// Capabilities belong to a thread: see <see cref="RunAgain"/> for the others.
    /// </summary>
    public static unsafe string? KeepOnly(IReadOnlyCollection<int> keep)
    {
        ArgumentNullException.ThrowIfNull(keep);
        var notDone = new List<string>();
        if (Interop.Libc.Prctl(PrSetNoNewPrivs, 1, 0, 0, 0) != 0)
            notDone.Add(Failure("prctl(PR_SET_NO_NEW_PRIVS)"));
        // The bounding set first (it takes CAP_SETPCAP in the effective set, which goes last).
        int last = LastCapability();
        for (int cap = 0; cap <= last; cap++)
        {
            if (keep.Contains(cap) || Interop.Libc.Prctl(PrCapbsetRead, (nuint)cap, 0, 0, 0) != 1)
                continue;
            if (Interop.Libc.Prctl(PrCapbsetDrop, (nuint)cap, 0, 0, 0) != 0 && Marshal.GetLastPInvokeError() != EInval)
            {
                notDone.Add(Failure($"prctl(PR_CAPBSET_DROP, {cap})") + ": the bounding set is left as it was");
                break;
            }
        }
        if (Interop.Libc.Prctl(PrCapAmbient, PrCapAmbientClearAll, 0, 0, 0) != 0 && Marshal.GetLastPInvokeError() != EInval)
            notDone.Add(Failure("prctl(PR_CAP_AMBIENT_CLEAR_ALL)"));
        var header = new Interop.Libc.CapHeader { Version = Version3, Pid = 0 };
        var data = stackalloc Interop.Libc.CapData[2];
        if (Interop.Libc.CapGet(&header, data) != 0)
        {
            notDone.Add(Failure("capget"));
            return string.Join("; ", notDone);
        }
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
        if (Interop.Libc.CapSet(&header, data) != 0)
            notDone.Add(Failure("capset"));
        return notDone.Count == 0 ? null : string.Join("; ", notDone);
    }

    /// <summary>
    /// Runs this program again in place (execve of <c>/proc/self/exe</c>, same arguments,
    /// environment and descriptors). Capabilities and no_new_privs are per thread, and the
    /// runtime starts threads of its own before <c>Main</c>, which <see cref="KeepOnly"/> on the
    /// main thread cannot reach; the new image starts from the narrowed thread alone. Returns
    /// only on failure, with why.
    /// </summary>
    public static unsafe string RunAgain(IReadOnlyList<string> args)
    {
        using var argv = new NativeStringArray([Environment.ProcessPath ?? "/proc/self/exe", .. args]);
        using var envp = new NativeStringArray(ChildProcess.EnvironmentEntries(null));
        fixed (byte* path = "/proc/self/exe\0"u8)
            Interop.Libc.Execve(path, argv.Pointer, envp.Pointer);
        return Failure("execve(/proc/self/exe)");
    }

    /// <summary>
    /// True when the calling thread has no_new_privs and nothing outside <paramref name="keep"/>
    /// (bit n: capability n) in its permitted set, so that nothing it runs, itself included, can
    /// hold more. Read from the thread's own status: nothing its starter could set says so.
    /// </summary>
    public static bool IsNarrowed(ulong keep)
    {
        const string status = "/proc/thread-self/status";
        return StatusField(status, "NoNewPrivs:", NumberStyles.Integer) == 1 && (StatusField(status, "CapPrm:", NumberStyles.HexNumber) & ~keep) == 0;
    }

    /// <summary>Null when the bounding set holds nothing outside <paramref name="keep"/>; else a note that it was left (no CAP_SETPCAP to narrow it).</summary>
    public static string? BoundingLeft(ulong keep) =>
        (Bounding() & ~keep) == 0 ? null : $"the bounding set {Bounding():x16} is left as it was (narrowing it takes CAP_SETPCAP)";

    /// <summary>The effective capabilities of every thread of this process together (<c>CapEff</c> of each task).</summary>
    public static ulong EffectiveOfAnyThread()
    {
        ulong any = 0;
        foreach (var task in Directory.EnumerateDirectories("/proc/self/task"))
        {
            try
            {
                any |= StatusField(Path.Combine(task, "status"), "CapEff:", NumberStyles.HexNumber);
            }
            catch (IOException)
            {
                // The thread ended meanwhile.
            }
        }
        return any;
    }

    /// <summary>This process's bounding set (<c>CapBnd</c>).</summary>
    public static ulong Bounding() => StatusField("/proc/self/status", "CapBnd:", NumberStyles.HexNumber);

    private static ulong StatusField(string statusFile, string field, NumberStyles style)
    {
        foreach (var line in File.ReadLines(statusFile))
        {
            if (line.StartsWith(field, StringComparison.Ordinal))
                return ulong.Parse(line.AsSpan(field.Length).Trim(), style, CultureInfo.InvariantCulture);
        }
        throw new IOException($"{statusFile} has no {field}");
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
