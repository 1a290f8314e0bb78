using System.Runtime.InteropServices;

namespace BFMig.Native.Linux;

/// <summary>A user from the system's user database (getpwnam_r).</summary>
public sealed record UnixUser(string Name, uint Uid, uint Gid, string Home, string Shell);

/// <summary>A group from the system's group database (getgrnam_r).</summary>
public sealed record UnixGroup(string Name, uint Gid, IReadOnlyList<string> Members);

/// <summary>User/group lookups and ownership changes, e.g. for sockets the QEMU user (libvirt-qemu:kvm on Debian) must reach.</summary>
public static class UnixUsers
{
    private const int MaxBuffer = 1 << 20;

    /// <summary>The effective uid of this process.</summary>
    public static uint EffectiveUid => Interop.Users.GetEuid();

    /// <summary>The user called <paramref name="name"/>, or null if there is none.</summary>
    public static unsafe UnixUser? GetUser(string name)
    {
        ArgumentException.ThrowIfNullOrEmpty(name);
        for (int size = 1024; ; size *= 2)
        {
            byte[] buffer = new byte[size];
            Interop.Users.Passwd pwd;
            Interop.Users.Passwd* result;
            int rc;
            fixed (byte* b = buffer)
            {
                rc = Interop.Users.GetPwNamR(name, &pwd, b, (nuint)size, &result);
                if (rc == 0)
                {
                    return result == null ? null : new UnixUser(Str(pwd.Name), pwd.Uid, pwd.Gid, Str(pwd.Dir), Str(pwd.Shell));
                }
            }
            if (rc != Interop.Users.ERange || size >= MaxBuffer)
            {
                throw new IOException($"getpwnam_r({name}) failed: {Marshal.GetPInvokeErrorMessage(rc)} (errno {rc})");
            }
        }
    }

    /// <summary>The group called <paramref name="name"/>, or null if there is none.</summary>
    public static unsafe UnixGroup? GetGroup(string name)
    {
        ArgumentException.ThrowIfNullOrEmpty(name);
        for (int size = 1024; ; size *= 2)
        {
            byte[] buffer = new byte[size];
            Interop.Users.Group grp;
            Interop.Users.Group* result;
            int rc;
            fixed (byte* b = buffer)
            {
                rc = Interop.Users.GetGrNamR(name, &grp, b, (nuint)size, &result);
                if (rc == 0)
                {
                    if (result == null)
                    {
                        return null;
                    }
                    var members = new List<string>();
                    for (byte** m = grp.Members; m != null && *m != null; m++)
                    {
                        members.Add(Str(*m));
                    }
                    return new UnixGroup(Str(grp.Name), grp.Gid, members);
                }
            }
            if (rc != Interop.Users.ERange || size >= MaxBuffer)
            {
                throw new IOException($"getgrnam_r({name}) failed: {Marshal.GetPInvokeErrorMessage(rc)} (errno {rc})");
            }
        }
    }

    /// <summary>chown(2); follows symlinks. Pass uint.MaxValue to leave the uid or gid unchanged.</summary>
    public static void ChangeOwner(string path, uint uid, uint gid)
    {
        if (Interop.Users.Chown(path, uid, gid) != 0)
        {
            int errno = Marshal.GetLastPInvokeError();
            throw new IOException($"chown {path} to {uid}:{gid} failed: {Marshal.GetPInvokeErrorMessage(errno)} (errno {errno})");
        }
    }

    /// <summary>chmod(2) with the permission bits of <paramref name="mode"/> (works on socket files too).</summary>
    public static void ChangeMode(string path, UnixFileMode mode)
    {
        if (Interop.Users.Chmod(path, (uint)mode) != 0)
        {
            int errno = Marshal.GetLastPInvokeError();
            throw new IOException($"chmod {path} to {Convert.ToString((int)mode, 8)} failed: {Marshal.GetPInvokeErrorMessage(errno)} (errno {errno})");
        }
    }

    private static unsafe string Str(byte* p) => Marshal.PtrToStringUTF8((nint)p) ?? "";
}
