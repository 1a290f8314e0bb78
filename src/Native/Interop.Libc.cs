using System.Runtime.InteropServices;

namespace BFMig.Native;

internal static partial class Interop
{
    /// <summary>The C library: memory that other libraries hand over to us, and a few system calls.</summary>
    internal static partial class Libc
    {
        internal const string Library = "libc";

        /// <summary>Frees memory that a C library allocated with malloc and documented as ours to free.</summary>
        [LibraryImport(Library, EntryPoint = "free")]
        internal static unsafe partial void Free(void* ptr);

        /// <summary>Changes the C environment (getenv in native code never sees Environment.SetEnvironmentVariable).</summary>
        [LibraryImport(Library, EntryPoint = "setenv", StringMarshalling = StringMarshalling.Utf8, SetLastError = true)]
        internal static partial int SetEnv(string name, string value, int overwrite);

        [LibraryImport(Library, EntryPoint = "unsetenv", StringMarshalling = StringMarshalling.Utf8, SetLastError = true)]
        internal static partial int UnsetEnv(string name);

        /// <summary>Starts (or waits for) writeback of a file range; see sync_file_range(2).</summary>
        [LibraryImport(Library, EntryPoint = "sync_file_range", SetLastError = true)]
        internal static partial int SyncFileRange(Microsoft.Win32.SafeHandles.SafeFileHandle fd, long offset, long nbytes, uint flags);

        /// <summary>Makes a file's data durable (and only the metadata needed to read it back); see fdatasync(2).</summary>
        [LibraryImport(Library, EntryPoint = "fdatasync", SetLastError = true)]
        internal static partial int Fdatasync(Microsoft.Win32.SafeHandles.SafeFileHandle fd);

        /// <summary>Advice about a range of this process's mappings; see madvise(2).</summary>
        [LibraryImport(Library, EntryPoint = "madvise", SetLastError = true)]
        internal static unsafe partial int Madvise(void* address, nuint length, int advice);

        /// <summary>Copies a NUL-terminated UTF-8 string that the caller owns, then frees it with free().</summary>
        internal static unsafe string? TakeUtf8(byte* owned)
        {
            if (owned == null)
            {
                return null;
            }
            try
            {
                return Marshal.PtrToStringUTF8((nint)owned);
            }
            finally
            {
                Free(owned);
            }
        }
    }
}

internal static partial class Interop
{
    internal static partial class Libc
    {
        [StructLayout(LayoutKind.Sequential)]
        internal struct Timespec
        {
            public long Seconds;
            public long Nanoseconds;
        }

        [LibraryImport(Library, EntryPoint = "close", SetLastError = true)]
        internal static partial int Close(int fd);

        /// <summary>open(2) without a mode (no O_CREAT).</summary>
        [LibraryImport(Library, EntryPoint = "open", StringMarshalling = StringMarshalling.Utf8, SetLastError = true)]
        internal static partial int Open(string path, int flags);

        /// <summary>statx(2): the buffer is a struct statx (256 bytes).</summary>
        [LibraryImport(Library, EntryPoint = "statx", SetLastError = true)]
        internal static unsafe partial int Statx(int dirFd, byte* path, int flags, uint mask, byte* buffer);

        [StructLayout(LayoutKind.Sequential)]
        internal struct PollFd
        {
            public int Fd;
            public short Events;
            public short Revents;
        }

        internal const short PollErr = 0x8, PollHup = 0x10, PollRdHup = 0x2000;

        /// <summary>poll(2).</summary>
        [LibraryImport(Library, EntryPoint = "poll", SetLastError = true)]
        internal static unsafe partial int Poll(PollFd* fds, nuint count, int timeoutMs);

        [LibraryImport(Library, EntryPoint = "clock_gettime", SetLastError = true)]
        internal static unsafe partial int ClockGetTime(int clock, Timespec* ts);

        /// <summary>prctl(2); variadic in C, and every option used here takes integer arguments only.</summary>
        [LibraryImport(Library, EntryPoint = "prctl", SetLastError = true)]
        internal static partial int Prctl(int option, nuint arg2, nuint arg3, nuint arg4, nuint arg5);

        [StructLayout(LayoutKind.Sequential)]
        internal struct CapHeader
        {
            public uint Version;
            public int Pid;
        }

        [StructLayout(LayoutKind.Sequential)]
        internal struct CapData
        {
            public uint Effective;
            public uint Permitted;
            public uint Inheritable;
        }

        /// <summary>capget(2), version 3: two <see cref="CapData"/> (capabilities 0-31, 32-63).</summary>
        [LibraryImport(Library, EntryPoint = "capget", SetLastError = true)]
        internal static unsafe partial int CapGet(CapHeader* header, CapData* data);

        [LibraryImport(Library, EntryPoint = "capset", SetLastError = true)]
        internal static unsafe partial int CapSet(CapHeader* header, CapData* data);

        /// <summary>execve(2): returns only on failure.</summary>
        [LibraryImport(Library, EntryPoint = "execve", SetLastError = true)]
        internal static unsafe partial int Execve(byte* path, byte** argv, byte** envp);
    }
}
