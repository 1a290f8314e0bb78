using System.Runtime.InteropServices;

namespace BFMig.Native;

internal static partial class Interop
{
    /// <summary>posix_spawn and friends from glibc: start a child with chosen descriptors in chosen slots.</summary>
    internal static partial class Spawn
    {
        private const string Libc = "libc.so.6";

        // glibc x86_64: posix_spawn_file_actions_t is 80 bytes, posix_spawnattr_t 336; callers
        // allocate generously so a different libc layout cannot overrun.
        internal const int OpaqueSize = 1024;

        [LibraryImport(Libc, EntryPoint = "posix_spawn_file_actions_init")]
        internal static partial int FileActionsInit(IntPtr actions);

        [LibraryImport(Libc, EntryPoint = "posix_spawn_file_actions_destroy")]
        internal static partial int FileActionsDestroy(IntPtr actions);

        [LibraryImport(Libc, EntryPoint = "posix_spawn_file_actions_adddup2")]
        internal static partial int FileActionsAddDup2(IntPtr actions, int fd, int newFd);

        [LibraryImport(Libc, EntryPoint = "posix_spawn_file_actions_addopen", StringMarshalling = StringMarshalling.Utf8)]
        internal static partial int FileActionsAddOpen(IntPtr actions, int fd, string path, int oflag, uint mode);

        /// <summary>glibc 2.34+: close every descriptor from <paramref name="from"/> up, in the child.</summary>
        [LibraryImport(Libc, EntryPoint = "posix_spawn_file_actions_addclosefrom_np")]
        internal static partial int FileActionsAddCloseFrom(IntPtr actions, int from);

        [LibraryImport(Libc, EntryPoint = "posix_spawnattr_init")]
        internal static partial int AttrInit(IntPtr attr);

        [LibraryImport(Libc, EntryPoint = "posix_spawnattr_destroy")]
        internal static partial int AttrDestroy(IntPtr attr);

        [LibraryImport(Libc, EntryPoint = "posix_spawnattr_setflags")]
        internal static partial int AttrSetFlags(IntPtr attr, short flags);

        [LibraryImport(Libc, EntryPoint = "posix_spawnattr_setsigdefault")]
        internal static partial int AttrSetSigDefault(IntPtr attr, IntPtr sigset);

        [LibraryImport(Libc, EntryPoint = "posix_spawnattr_setsigmask")]
        internal static partial int AttrSetSigMask(IntPtr attr, IntPtr sigset);

        [LibraryImport(Libc, EntryPoint = "sigfillset")]
        internal static partial int SigFillSet(IntPtr set);

        [LibraryImport(Libc, EntryPoint = "sigemptyset")]
        internal static partial int SigEmptySet(IntPtr set);

        internal const int SIG_SETMASK = 2;

        [LibraryImport(Libc, EntryPoint = "pthread_sigmask")]
        internal static partial int PthreadSigMask(int how, IntPtr set, IntPtr oldSet);

        [LibraryImport(Libc, EntryPoint = "posix_spawn", StringMarshalling = StringMarshalling.Utf8)]
        internal static unsafe partial int PosixSpawn(out int pid, string path, IntPtr fileActions, IntPtr attr, byte** argv, byte** envp);

        [LibraryImport(Libc, EntryPoint = "waitpid", SetLastError = true)]
        internal static partial int WaitPid(int pid, out int status, int options);

        [LibraryImport(Libc, EntryPoint = "kill", SetLastError = true)]
        internal static partial int Kill(int pid, int signal);

        internal const short POSIX_SPAWN_SETSIGMASK = 0x08;
        internal const short POSIX_SPAWN_SETSIGDEF = 0x04;
        internal const short POSIX_SPAWN_SETSID = 0x80;
        internal const int O_RDWR = 2;
        internal const int EINTR = 4;
    }
}
