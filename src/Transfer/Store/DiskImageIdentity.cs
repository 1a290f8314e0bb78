using System.Globalization;

namespace BFMig.Transfer.Store;

/// <summary>
/// Which file a block map describes and how it looked when the map was made. If any field
/// differs now, something touched the image since and the map is stale.
/// </summary>
/// <param name="Path">Absolute path of the image.</param>
/// <param name="Inode">Inode number (0 when it could not be read).</param>
/// <param name="Size">File size in bytes (of the container file, not the virtual disk).</param>
/// <param name="MtimeTicks">Last write time, UTC ticks (100 ns).</param>
/// <param name="Format">Image format as QEMU names it ("qcow2", "raw").</param>
public sealed record DiskImageIdentity(string Path, ulong Inode, ulong Size, long MtimeTicks, string Format)
{
    /// <summary>Longest format name stored.</summary>
    public const int MaxFormatLength = 32;

    /// <summary>Longest path stored (PATH_MAX).</summary>
    public const int MaxPathLength = 4096;

    /// <summary>Reads the identity of the file at <paramref name="path"/> now.</summary>
    public static DiskImageIdentity Capture(string path, string format)
    {
        string full = System.IO.Path.GetFullPath(path);
        var info = new FileInfo(full);
        if (!info.Exists)
            throw new FileNotFoundException("disk image not found", full);
        return new DiskImageIdentity(full, ReadInode(full), (ulong)info.Length, info.LastWriteTimeUtc.Ticks, format);
    }

    // .NET exposes no inode; Linux (>= 5.14) prints it in /proc/self/fdinfo. Interop lives in
    // BFMig.Native, which does not offer stat(2) yet, hence this route; 0 means "unknown".
    private static ulong ReadInode(string path)
    {
        try
        {
            using var handle = File.OpenHandle(path, FileMode.Open, FileAccess.Read, FileShare.ReadWrite | FileShare.Delete);
            long fd = handle.DangerousGetHandle();
            foreach (string line in File.ReadLines($"/proc/self/fdinfo/{fd}"))
            {
                if (line.StartsWith("ino:", StringComparison.Ordinal)
                    && ulong.TryParse(line.AsSpan(4).Trim(), NumberStyles.None, CultureInfo.InvariantCulture, out ulong ino))
                    return ino;
            }
        }
        catch (IOException)
        {
        }
        catch (UnauthorizedAccessException)
        {
        }
        return 0;
    }
}
