using System.Buffers.Binary;
using System.Globalization;
using System.IO.Hashing;

namespace BFMig.Transfer.Disk;

/// <summary>
/// Which file a block map describes and how it looked when the map was made. If any field
/// differs now, something touched the image since and the map is stale.
/// </summary>
/// <param name="Path">Absolute path of the image.</param>
/// <param name="Inode">Inode number (0 when it could not be read).</param>
/// <param name="Size">File size in bytes (of the container file, not the virtual disk).</param>
/// <param name="MtimeTicks">Last write time, UTC ticks (100 ns).</param>
/// <param name="Format">Image format as QEMU names it ("qcow2", "raw").</param>
/// <param name="Fingerprint">
/// XxHash128 of sampled content (<see cref="ReadFingerprint"/>): a restore in place that keeps
/// size and mtime (<c>cp --preserve</c>, <c>touch -r</c>), or an inode that reads 0, still shows.
/// </param>
public sealed record DiskImageIdentity(string Path, ulong Inode, ulong Size, long MtimeTicks, string Format, UInt128 Fingerprint = default)
{
    /// <summary>Bytes read from the start of the file (a qcow2 header with its extensions, a raw image's partition table and boot code).</summary>
    public const int HeadBytes = 64 << 10;

    /// <summary>Pieces of <see cref="SampleBytes"/> read at evenly spaced offsets over the whole file.</summary>
    public const int Samples = 64;

    /// <summary>Size of one sampled piece.</summary>
    public const int SampleBytes = 4096;

    /// <summary>Most of a qcow2 L1 table read (it maps every cluster: any change of allocation changes it).</summary>
    public const int MaxL1Bytes = 4 << 20;

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
        if (!IsRegularFile(full))
            throw new NotAFileException(full);
        return new DiskImageIdentity(full, ReadInode(full), (ulong)info.Length, info.LastWriteTimeUtc.Ticks, format, ReadFingerprint(full, format));
    }

    /// <summary>
    /// True when <paramref name="path"/> (following links) is a regular file: only a file's
    /// identity says whether it was written (a block device's timestamps do not move when it is,
    /// and opening a FIFO or a character device to fingerprint it could block or consume it).
    /// </summary>
    public static bool IsRegularFile(string path) => BFMig.Native.Linux.DeviceNode.Stat(path) is { IsRegularFile: true };

    /// <summary>
    /// Hash of the first <see cref="HeadBytes"/>, for qcow2 the L1 table (up to
    /// <see cref="MaxL1Bytes"/>), and <see cref="Samples"/> pieces spread over the file: about
    /// 330 KiB read for any size of image. A change confined to unsampled data clusters can still
    /// pass, which is why this adds to size and mtime rather than replacing them.
    /// </summary>
    public static UInt128 ReadFingerprint(string path, string format)
    {
        using var handle = File.OpenHandle(path, FileMode.Open, FileAccess.Read, FileShare.ReadWrite | FileShare.Delete);
        long length = RandomAccess.GetLength(handle);
        var hash = new XxHash128();
        var buffer = new byte[Math.Max(HeadBytes, SampleBytes)];
        int head = ReadAt(handle, buffer.AsSpan(0, (int)Math.Min(HeadBytes, length)), 0);
        hash.Append(buffer.AsSpan(0, head));
        // qcow2 header (QEMU docs/interop/qcow2.txt): be32 l1_size at 36, be64 l1_table_offset at 40.
        if (format == "qcow2" && head >= 48 && BinaryPrimitives.ReadUInt32BigEndian(buffer) == 0x514649fb)
        {
            long l1Bytes = Math.Min((long)BinaryPrimitives.ReadUInt32BigEndian(buffer.AsSpan(36)) * 8, MaxL1Bytes);
            ulong l1Offset = BinaryPrimitives.ReadUInt64BigEndian(buffer.AsSpan(40));
            if (l1Bytes > 0 && l1Offset < (ulong)length)
            {
                var l1 = new byte[Math.Min(l1Bytes, length - (long)l1Offset)];
                hash.Append(l1.AsSpan(0, ReadAt(handle, l1, (long)l1Offset)));
            }
        }
        for (int i = 0; i < Samples && length > 0; i++)
        {
            long at = length / Samples * i;
            hash.Append(buffer.AsSpan(0, ReadAt(handle, buffer.AsSpan(0, (int)Math.Min(SampleBytes, length - at)), at)));
        }
        return hash.GetCurrentHashAsUInt128();
    }

    private static int ReadAt(Microsoft.Win32.SafeHandles.SafeFileHandle handle, Span<byte> destination, long offset)
    {
        int done = 0;
        while (done < destination.Length)
        {
            int n = RandomAccess.Read(handle, destination[done..], offset + done);
            if (n == 0) break;
            done += n;
        }
        return done;
    }

    /// <summary>"PATH (FORMAT, inode N, S bytes, mtime T)" for messages.</summary>
    public string Describe() => IsPending
        ? $"{Path} ({Format}, not captured yet)"
        : $"{Path} ({Format}, inode {Inode}, {Size} bytes, mtime {new DateTime(MtimeTicks, DateTimeKind.Utc):yyyy-MM-dd'T'HH:mm:ss.fffffff'Z'}, content {Fingerprint:x32})";

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

/// <summary>
/// The image is not a regular file (a block device): it has no identity that could prove it
/// unwritten, only a re-hash can (<see cref="DiskRehash"/>).
/// </summary>
public sealed class NotAFileException(string path)
    : IOException($"{path} is not a regular file: its identity cannot tell whether it was written, only a re-hash can")
{
    /// <summary>The image's path.</summary>
    public string ImagePath { get; } = path;
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

    /// <summary>The image is a block device: its identity stays pending, the next trip's receiver re-hashes it.</summary>
    NotAFile,
}
