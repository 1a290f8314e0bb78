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

    /// <summary>
    /// True when only path and format are known: the image was still open in the QEMU that
    /// wrote it (the source QEMU rewrites the image header when it lets go of it), so inode, size
    /// and mtime are captured later by <see cref="DiskBlockMap.SealIdentity"/>. A pending identity
    /// never equals a captured one, so such a map is never trusted for the image it names.
    /// </summary>
    public bool IsPending { get; init; }

    /// <summary>An identity naming <paramref name="path"/> whose state is captured later.</summary>
    public static DiskImageIdentity PendingCapture(string path, string format) =>
        new(System.IO.Path.GetFullPath(path), 0, 0, 0, format) { IsPending = true };

    /// <summary>Reads the identity of the file at <paramref name="path"/> now.</summary>
    public static DiskImageIdentity Capture(string path, string format)
    {
        string full = System.IO.Path.GetFullPath(path);
        var info = new FileInfo(full);
        if (!info.Exists)
            throw new FileNotFoundException("disk image not found", full);
        return new DiskImageIdentity(full, ReadInode(full), (ulong)info.Length, info.LastWriteTimeUtc.Ticks, format);
    }

    /// <summary>"PATH (FORMAT, inode N, S bytes, mtime T)" for messages.</summary>
    public string Describe() => IsPending
        ? $"{Path} ({Format}, not captured yet)"
        : $"{Path} ({Format}, inode {Inode}, {Size} bytes, mtime {new DateTime(MtimeTicks, DateTimeKind.Utc):yyyy-MM-dd'T'HH:mm:ss.fffffff'Z'})";

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

/// <summary>What <see cref="DiskBlockMap.SealIdentity"/> did.</summary>
public enum SealResult
{
    /// <summary>The identity was captured and saved: the map may now be trusted for its image.</summary>
    Sealed,

    /// <summary>No map file.</summary>
    NoMap,

    /// <summary>The map is in flux (a trip is writing, or one failed): left alone.</summary>
    InFlux,

    /// <summary>The map's last trip was unclean: left alone.</summary>
    Unclean,

    /// <summary>The map has no pending identity (none at all, or already captured): left alone.</summary>
    NotPending,

    /// <summary>The image the map names does not exist: left alone.</summary>
    ImageMissing,
}
