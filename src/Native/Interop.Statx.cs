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

        /// <summary>lseek(2) (64-bit off_t on every 64-bit Linux): a block device's size is its end.</summary>
        [LibraryImport(Library, EntryPoint = "lseek", SetLastError = true)]
        internal static partial long LSeek(Microsoft.Win32.SafeHandles.SafeFileHandle fd, long offset, int whence);

        internal const int SeekEnd = 2;

        internal const int AtFdCwd = -100;
        internal const int AtEmptyPath = 0x1000;
        internal const uint StatxBasicStats = 0x7ff;
        internal const int AtSymlinkNoFollow = 0x100;
        internal const uint StatxBlocks = 0x400;

        /// <summary>sizeof(struct statx).</summary>
        internal const int StatxLength = 256;

        /// <summary>Offset of stx_blocks (u64, 512-byte units) in struct statx.</summary>
        internal const int StatxBlocksOffset = 48;

        /// <summary>Offsets of stx_uid, stx_gid (u32), stx_mode (u16), stx_ino (u64), stx_rdev_major/minor (u32).</summary>
        internal const int StatxUidOffset = 20, StatxGidOffset = 24, StatxModeOffset = 28, StatxInoOffset = 32, StatxRdevMajorOffset = 128, StatxRdevMinorOffset = 132;
    }
}
