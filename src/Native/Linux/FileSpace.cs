using System.Runtime.InteropServices;

namespace BFMig.Native.Linux;

/// <summary>
/// What a file really occupies on disk. The stores are sparse (a RAM block's page file is as long
/// as the block but holds only the pages received), so their length says little about their cost.
/// </summary>
public static class FileSpace
{
    /// <summary>
    /// Bytes allocated to the file (st_blocks x 512), not following a symbolic link; null when it
    /// cannot be read (gone, no permission).
    /// </summary>
    public static unsafe long? AllocatedBytes(string path)
    {
        byte* buffer = stackalloc byte[Interop.Libc.StatxLength];
        if (Interop.Libc.Statx(Interop.Libc.AtFdCwd, path, Interop.Libc.AtSymlinkNoFollow, Interop.Libc.StatxBlocks, buffer) != 0)
            return null;
        var stat = new ReadOnlySpan<byte>(buffer, Interop.Libc.StatxLength);
        return (long)MemoryMarshal.Read<ulong>(stat[Interop.Libc.StatxBlocksOffset..]) * 512;
    }

    /// <summary>
    /// Bytes allocated to every file under <paramref name="directory"/> (recursively, links not
    /// followed); 0 when it does not exist. Files that vanish while it counts are skipped.
    /// </summary>
    public static long AllocatedBytesUnder(string directory)
    {
        if (!Directory.Exists(directory))
            return 0;
        long total = 0;
        try
        {
            var options = new EnumerationOptions { RecurseSubdirectories = true, AttributesToSkip = FileAttributes.ReparsePoint, IgnoreInaccessible = true };
            foreach (var file in Directory.EnumerateFiles(directory, "*", options))
                total += AllocatedBytes(file) ?? 0;
        }
        catch (DirectoryNotFoundException)
        {
            // Removed while counting (forgotten or evicted): what was counted stands.
        }
        return total;
    }
}
