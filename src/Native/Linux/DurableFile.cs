namespace BFMig.Native.Linux;

/// <summary>
/// Replacing a file so that a crash (power loss included) leaves either the old content or the
/// new, never a mix or nothing: write a temporary file beside it, fsync it, rename it over the
/// target, then fsync the directory. Without the last step the rename itself may not survive a
/// power loss on ext4/XFS, and a state file that "went back in time" is worse than a missing one.
/// </summary>
public static class DurableFile
{
    /// <summary>Writes <paramref name="content"/> to <paramref name="path"/> crash-consistently.</summary>
    public static void WriteAtomically(string path, ReadOnlySpan<byte> content)
    {
        string tmp = path + ".tmp";
        using (var f = new FileStream(tmp, FileMode.Create, FileAccess.Write, FileShare.None))
        {
            f.Write(content);
            f.Flush(flushToDisk: true);
        }
        Replace(tmp, path);
    }

    /// <summary>
    /// Renames the already-fsynced <paramref name="source"/> over <paramref name="destination"/> and makes the
    /// rename durable.
    /// </summary>
    public static void Replace(string source, string destination)
    {
        File.Move(source, destination, overwrite: true);
        FsyncDirectory(Path.GetDirectoryName(Path.GetFullPath(destination))!);
    }

    /// <summary>
    /// Starts writeback of <paramref name="length"/> bytes at <paramref name="offset"/> of <paramref name="file"/>
    /// without waiting for it (SYNC_FILE_RANGE_WRITE). Returns false where the file system does
    /// not support it (the final fsync still makes the data durable).
    /// </summary>
    public static bool StartWriteback(Microsoft.Win32.SafeHandles.SafeFileHandle file, long offset, long length)
    {
        const uint SyncFileRangeWrite = 2;
        return Interop.Libc.SyncFileRange(file, offset, length, SyncFileRangeWrite) == 0;
    }

    /// <summary>
    /// Starts writeback of the range and waits until it reached the device (WAIT_BEFORE | WRITE |
    /// WAIT_AFTER: data only, no metadata, no cache flush: not a durability promise, a bound on
    /// how much of a file's data is queued).
    /// </summary>
    public static bool FinishWriteback(Microsoft.Win32.SafeHandles.SafeFileHandle file, long offset, long length)
    {
        const uint WaitBeforeWriteWaitAfter = 1 | 2 | 4;
        return Interop.Libc.SyncFileRange(file, offset, length, WaitBeforeWriteWaitAfter) == 0;
    }

    /// <summary>
    /// fdatasync(2): the file's data reaches stable storage, the device's volatile write cache
    /// included. False when the call failed (the caller decides whether that matters).
    /// </summary>
    public static bool SyncData(Microsoft.Win32.SafeHandles.SafeFileHandle file) => Interop.Libc.Fdatasync(file) == 0;

    /// <summary>Makes renames and unlinks inside <paramref name="directory"/> durable.</summary>
    public static void FsyncDirectory(string directory)
    {
        // A directory opened read-only can be fsynced; that commits its entries. File systems that
        // refuse it (some FUSE or network ones) give no stronger promise to wait for.
        try
        {
            using var h = File.OpenHandle(directory, FileMode.Open, FileAccess.Read);
            RandomAccess.FlushToDisk(h);
        }
        catch (UnauthorizedAccessException)
        {
        }
        catch (IOException)
        {
        }
    }
}
