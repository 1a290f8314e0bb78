using System.Runtime.InteropServices;
using gid_t = uint;
using uid_t = uint;

namespace BFMig.Native;

internal static partial class Interop
{
    /// <summary>User and group database lookups, and file ownership.</summary>
    internal static partial class Users
    {
        internal const int ERange = 34;

        /// <summary>struct passwd (glibc).</summary>
        [StructLayout(LayoutKind.Sequential)]
        internal unsafe struct Passwd
        {
            public byte* Name;
            public byte* Password;
            public uid_t Uid;
            public gid_t Gid;
            public byte* Gecos;
            public byte* Dir;
            public byte* Shell;
        }

        /// <summary>struct group (glibc).</summary>
        [StructLayout(LayoutKind.Sequential)]
        internal unsafe struct Group
        {
            public byte* Name;
            public byte* Password;
            public gid_t Gid;
            public byte** Members;
        }

        // The _r variants: getpwnam's static buffer is not safe with several threads.
        [LibraryImport(Libc.Library, EntryPoint = "getpwnam_r", StringMarshalling = StringMarshalling.Utf8)]
        internal static unsafe partial int GetPwNamR(string name, Passwd* pwd, byte* buffer, nuint bufferLength, Passwd** result);

        [LibraryImport(Libc.Library, EntryPoint = "getgrnam_r", StringMarshalling = StringMarshalling.Utf8)]
        internal static unsafe partial int GetGrNamR(string name, Group* grp, byte* buffer, nuint bufferLength, Group** result);

        [LibraryImport(Libc.Library, EntryPoint = "chown", StringMarshalling = StringMarshalling.Utf8, SetLastError = true)]
        internal static partial int Chown(string path, uid_t owner, gid_t group);

        [LibraryImport(Libc.Library, EntryPoint = "chmod", StringMarshalling = StringMarshalling.Utf8, SetLastError = true)]
        internal static partial int Chmod(string path, uint mode);

        [LibraryImport(Libc.Library, EntryPoint = "geteuid")]
        internal static partial uid_t GetEuid();
    }
}
