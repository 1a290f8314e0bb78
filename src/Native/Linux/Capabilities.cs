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
    private const int PrGetNoNewPrivs = 39;
    private const int PrSetName = 15;
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
        if (SetNoNewPrivileges() is { } nnp)
            notDone.Add(nnp);
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
    /// Runs this program again in place (execve of <c>/proc/self/exe</c>, with the argv[0] it was
    /// started with, the same arguments, environment and descriptors, and no signal blocked: a
    /// mask survives execve, and the new image must hear bfmigd's SIGTERM and SIGCONT).
    /// Capabilities and no_new_privs are per thread, and the runtime starts threads of its own
    /// before <c>Main</c>, which <see cref="KeepOnly"/> on the main thread cannot reach; the new
    /// image starts from the narrowed thread alone. Returns only on failure, with why.
    /// </summary>
    public static unsafe string RunAgain(IReadOnlyList<string> args)
    {
        using var argv = new NativeStringArray([StartedAs(), .. args]);
        using var envp = new NativeStringArray(ChildProcess.EnvironmentEntries(null));
        var none = Marshal.AllocHGlobal(Interop.Spawn.OpaqueSize);
        try
        {
            Interop.Spawn.SigEmptySet(none);
            Interop.Spawn.PthreadSigMask(Interop.Spawn.SIG_SETMASK, none, IntPtr.Zero);
            fixed (byte* path = "/proc/self/exe\0"u8)
                Interop.Libc.Execve(path, argv.Pointer, envp.Pointer);
            return Failure("execve(/proc/self/exe)");
        }
        finally
        {
            Marshal.FreeHGlobal(none);
        }
    }

    // argv[0] as this process got it (/proc/self/cmdline): what ps and pgrep -f show, unlike the
    // executable's path, which reads "... (deleted)" once the file was replaced.
    private static string StartedAs()
    {
        try
        {
            var cmdline = File.ReadAllBytes("/proc/self/cmdline");
            int end = Array.IndexOf(cmdline, (byte)0);
            if (end > 0)
                return System.Text.Encoding.UTF8.GetString(cmdline, 0, end);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            // The path below will do.
        }
        return Environment.ProcessPath ?? "/proc/self/exe";
    }

    /// <summary>The calling thread's permitted capabilities (capget; throws <see cref="IOException"/> when it fails).</summary>
    public static unsafe ulong Permitted()
    {
        var header = new Interop.Libc.CapHeader { Version = Version3, Pid = 0 };
        var data = stackalloc Interop.Libc.CapData[2];
        if (Interop.Libc.CapGet(&header, data) != 0)
            throw new IOException(Failure("capget"));
        return data[0].Permitted | (ulong)data[1].Permitted << 32;
    }

    /// <summary>True when the calling thread has no_new_privs (nothing it runs can gain privileges).</summary>
    public static bool NoNewPrivileges() => Interop.Libc.Prctl(PrGetNoNewPrivs, 0, 0, 0, 0) == 1;

    /// <summary>Sets no_new_privs on the calling thread (kept by what it starts and runs); null when done, else why not.</summary>
    public static string? SetNoNewPrivileges() =>
        Interop.Libc.Prctl(PrSetNoNewPrivs, 1, 0, 0, 0) == 0 ? null : Failure("prctl(PR_SET_NO_NEW_PRIVS)");

    /// <summary>
    /// Names this process (its <c>comm</c>, 15 bytes at most: what <c>ps</c> and <c>pgrep -x</c>
    /// show). An image started from <c>/proc/self/exe</c> would otherwise be called "exe".
    /// </summary>
    public static unsafe void SetName(string name)
    {
        Span<byte> bytes = stackalloc byte[16];
        int n = System.Text.Encoding.UTF8.GetBytes(name.AsSpan(0, Math.Min(name.Length, 15)), bytes);
        bytes[Math.Min(n, 15)] = 0;
        fixed (byte* p = bytes)
            Interop.Libc.Prctl(PrSetName, (nuint)p, 0, 0, 0);
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
                any |= StatusMask(Path.Combine(task, "status"), "CapEff:");
            }
            catch (IOException)
            {
                // The thread ended meanwhile.
            }
        }
        return any;
    }

    /// <summary>This process's bounding set (<c>CapBnd</c>).</summary>
    public static ulong Bounding() => StatusMask("/proc/self/status", "CapBnd:");

    private static ulong StatusMask(string statusFile, string field)
    {
        foreach (var line in File.ReadLines(statusFile))
        {
            if (line.StartsWith(field, StringComparison.Ordinal))
                return ulong.Parse(line.AsSpan(field.Length).Trim(), NumberStyles.HexNumber, CultureInfo.InvariantCulture);
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
