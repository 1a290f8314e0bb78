using System.Runtime.InteropServices;

namespace BFMig.Native;

internal static partial class Interop
{
    internal static partial class Libc
    {
        /// <summary>
        /// statx(2) (glibc 2.28+). Its struct has one layout on every architecture, unlike struct
        /// stat, so a fixed buffer with known offsets serves.
        /// </summary>
        [LibraryImport(Library, EntryPoint = "statx", StringMarshalling = StringMarshalling.Utf8, SetLastError = true)]
        internal static unsafe partial int Statx(int dirfd, string path, int flags, uint mask, byte* buffer);

        internal const int AtFdCwd = -100;
        internal const int AtSymlinkNoFollow = 0x100;
        internal const uint StatxBlocks = 0x400;

        /// <summary>sizeof(struct statx).</summary>
        internal const int StatxLength = 256;

        /// <summary>Offset of stx_blocks (u64, 512-byte units) in struct statx.</summary>
        internal const int StatxBlocksOffset = 48;
    }
}
