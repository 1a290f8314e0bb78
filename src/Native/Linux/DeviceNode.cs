using System.Runtime.InteropServices;
using Microsoft.Win32.SafeHandles;

namespace BFMig.Native.Linux;

/// <summary>An owner of a file: uid and gid.</summary>
public readonly record struct NodeOwner(uint Uid, uint Gid);

/// <summary>What lstat/fstat says about one file: type and permission bits, owner, inode, device number.</summary>
public readonly record struct NodeStatus(uint Mode, uint Uid, uint Gid, ulong Inode, uint RdevMajor, uint RdevMinor)
{
    private const uint TypeMask = 0xF000;

    /// <summary>A directory.</summary>
    public bool IsDirectory => (Mode & TypeMask) == 0x4000;

    /// <summary>A symbolic link (only from lstat).</summary>
    public bool IsSymlink => (Mode & TypeMask) == 0xA000;

    /// <summary>A block device.</summary>
    public bool IsBlockDevice => (Mode & TypeMask) == 0x6000;

    /// <summary>A regular file.</summary>
    public bool IsRegularFile => (Mode & TypeMask) == 0x8000;

    /// <summary>Group or others may write it.</summary>
    public bool WritableByGroupOrOthers => (Mode & 0x12) != 0;
}

/// <summary>
/// Opens a block device only along a path no less privileged user can change: bfmigd's helpers
/// run as root and read whatever a guest's XML names, so a path through a directory a user can
/// write (or a symbolic link such a user placed) could make them read something else. Every
/// directory on the way, and every symbolic link followed (LVM's <c>/dev/VG/LV</c>,
/// <c>/dev/mapper/*</c>, <c>/dev/disk/by-*</c>), must belong to root and be writable by root
/// alone; the node must be a block device of root (group root or <c>disk</c>) or of the one
/// other owner given (the QEMU user: libvirt hands a guest's device to it while the guest runs),
/// and writable by nobody else.
/// </summary>
public static class DeviceNode
{
    /// <summary>Most symbolic links followed in one resolution (the kernel's own limit).</summary>
    public const int MaxLinks = 40;

    /// <summary>Status of <paramref name="path"/> itself (not following a last symbolic link); null when it cannot be read.</summary>
    public static unsafe NodeStatus? LStat(string path)
    {
        byte* buffer = stackalloc byte[Interop.Libc.StatxLength];
        if (Interop.Libc.Statx(Interop.Libc.AtFdCwd, path, Interop.Libc.AtSymlinkNoFollow, Interop.Libc.StatxBasicStats, buffer) != 0)
            return null;
        return Decode(new ReadOnlySpan<byte>(buffer, Interop.Libc.StatxLength));
    }

    /// <summary>Status of <paramref name="path"/>, following symbolic links; null when it cannot be read.</summary>
    public static unsafe NodeStatus? Stat(string path)
    {
        byte* buffer = stackalloc byte[Interop.Libc.StatxLength];
        if (Interop.Libc.Statx(Interop.Libc.AtFdCwd, path, 0, Interop.Libc.StatxBasicStats, buffer) != 0)
            return null;
        return Decode(new ReadOnlySpan<byte>(buffer, Interop.Libc.StatxLength));
    }

    /// <summary>Status of the open file <paramref name="handle"/>.</summary>
    public static unsafe NodeStatus FStat(SafeFileHandle handle)
    {
        bool added = false;
        byte* buffer = stackalloc byte[Interop.Libc.StatxLength];
        try
        {
            handle.DangerousAddRef(ref added);
            int fd = (int)handle.DangerousGetHandle();
            if (Interop.Libc.Statx(fd, "", Interop.Libc.AtEmptyPath, Interop.Libc.StatxBasicStats, buffer) != 0)
                throw new IOException($"statx on an open file failed: {Marshal.GetLastPInvokeErrorMessage()}");
        }
        finally
        {
            if (added) handle.DangerousRelease();
        }
        return Decode(new ReadOnlySpan<byte>(buffer, Interop.Libc.StatxLength));
    }

    /// <summary>True when <paramref name="path"/> (following links) is a block device.</summary>
    public static bool IsBlockDevice(string path) => Stat(path) is { IsBlockDevice: true };

    /// <summary>
    /// The path <paramref name="path"/> leads to, with every symbolic link resolved, checked as
    /// the type says (directories and links only); throws <see cref="UnauthorizedAccessException"/> naming the first component
    /// that fails a check, <see cref="IOException"/> when one cannot be read.
    /// </summary>
    public static string ResolveSafely(string path)
    {
        if (!path.StartsWith('/'))
            throw new UnauthorizedAccessException($"{path}: not an absolute path");
        var pending = new List<string>(path.Split('/', StringSplitOptions.RemoveEmptyEntries));
        string current = "/";
        CheckDirectory(current);
        int links = 0;
        while (pending.Count > 0)
        {
            string name = pending[0];
            pending.RemoveAt(0);
            if (name == ".")
                continue;
            if (name == "..")
            {
                // Its parent was checked on the way down (or is the root).
                current = Path.GetDirectoryName(current) ?? "/";
                continue;
            }
            string next = current == "/" ? "/" + name : current + "/" + name;
            var status = LStat(next) ?? throw new IOException($"{next}: cannot be read ({Marshal.GetLastPInvokeErrorMessage()})");
            if (status.IsSymlink)
            {
                if (status.Uid != 0)
                    throw new UnauthorizedAccessException($"{next}: a symbolic link not owned by root");
                if (++links > MaxLinks)
                    throw new IOException($"{path}: more than {MaxLinks} symbolic links");
                string target = new FileInfo(next).LinkTarget ?? throw new IOException($"{next}: cannot read the link");
                if (target.StartsWith('/'))
                    current = "/";
                pending.InsertRange(0, target.Split('/', StringSplitOptions.RemoveEmptyEntries));
                continue;
            }
            if (pending.Count > 0)
                CheckDirectory(next, status);
            current = next;
        }
        return current;
    }

    /// <summary>
    /// Opens the block device at <paramref name="path"/> for reading (see the type for the
    /// checks; <paramref name="lentTo"/>: the QEMU user, who may own it while a guest uses it); returns the handle and the resolved path. Throws
    /// <see cref="UnauthorizedAccessException"/> when a check fails, <see cref="IOException"/>
    /// when something cannot be read.
    /// </summary>
    public static (SafeFileHandle Handle, string Resolved) OpenBlockDeviceForReading(string path, NodeOwner? lentTo)
    {
        string resolved = ResolveSafely(path);
        var before = LStat(resolved) ?? throw new IOException($"{resolved}: cannot be read");
        CheckDevice(resolved, before, lentTo);
        var handle = File.OpenHandle(resolved, FileMode.Open, FileAccess.Read, FileShare.ReadWrite | FileShare.Delete);
        try
        {
            var opened = FStat(handle);
            if (!opened.IsBlockDevice || opened.Inode != before.Inode || opened.RdevMajor != before.RdevMajor || opened.RdevMinor != before.RdevMinor)
                throw new UnauthorizedAccessException($"{resolved}: changed while it was opened");
            return (handle, resolved);
        }
        catch
        {
            handle.Dispose();
            throw;
        }
    }

    /// <summary>Size in bytes of the device open as <paramref name="handle"/> (its end).</summary>
    public static long Size(SafeFileHandle handle)
    {
        long end = Interop.Libc.LSeek(handle, 0, Interop.Libc.SeekEnd);
        return end >= 0 ? end : throw new IOException($"lseek on a block device failed: {Marshal.GetLastPInvokeErrorMessage()}");
    }

    private static void CheckDirectory(string path, NodeStatus? known = null)
    {
        var status = known ?? LStat(path) ?? throw new IOException($"{path}: cannot be read");
        if (!status.IsDirectory)
            throw new UnauthorizedAccessException($"{path}: not a directory");
        if (status.Uid != 0 || status.WritableByGroupOrOthers)
            throw new UnauthorizedAccessException($"{path}: a directory that someone other than root can change (owner {status.Uid}, mode {Convert.ToString(status.Mode & 0xFFF, 8)})");
    }

    private static void CheckDevice(string path, NodeStatus status, NodeOwner? lentTo)
    {
        if (!status.IsBlockDevice)
            throw new UnauthorizedAccessException($"{path}: not a block device");
        bool rootOwned = status.Uid == 0 && (status.Gid == 0 || status.Gid == DiskGroup.Value);
        bool qemuOwned = lentTo is { } qemu && status.Uid == qemu.Uid && (status.Gid == 0 || status.Gid == DiskGroup.Value || status.Gid == qemu.Gid);
        if (!rootOwned && !qemuOwned)
            throw new UnauthorizedAccessException($"{path}: a block device of {status.Uid}:{status.Gid}, neither root's (group root or disk) nor the QEMU user's");
        if ((status.Mode & 0x2) != 0)
            throw new UnauthorizedAccessException($"{path}: a block device anybody may write");
    }

    // "disk" is the group of disk devices on Debian and Fedora alike; none means only root's group counts.
    private static readonly Lazy<uint?> DiskGroup = new(() =>
    {
        try
        {
            return UnixUsers.GetGroup("disk")?.Gid;
        }
        catch (IOException)
        {
            return null;
        }
    });

    private static NodeStatus Decode(ReadOnlySpan<byte> s) => new(
        MemoryMarshal.Read<ushort>(s[Interop.Libc.StatxModeOffset..]),
        MemoryMarshal.Read<uint>(s[Interop.Libc.StatxUidOffset..]),
        MemoryMarshal.Read<uint>(s[Interop.Libc.StatxGidOffset..]),
        MemoryMarshal.Read<ulong>(s[Interop.Libc.StatxInoOffset..]),
        MemoryMarshal.Read<uint>(s[Interop.Libc.StatxRdevMajorOffset..]),
        MemoryMarshal.Read<uint>(s[Interop.Libc.StatxRdevMinorOffset..]));
}
