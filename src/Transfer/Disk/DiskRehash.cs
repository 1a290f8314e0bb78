using System.Buffers;
using System.Diagnostics;
using BFMig.Native.Linux;
using Microsoft.Win32.SafeHandles;

namespace BFMig.Transfer.Disk;

/// <summary>How much a re-hash may cost this host.</summary>
/// <param name="BytesPerSecond">Read rate cap, for all re-hashes of this host together (they run one at a time).</param>
/// <param name="Timeout">Longest a re-hash may take, waiting for another one included; past it the disk is sent whole.</param>
public sealed record DiskRehashLimits(long BytesPerSecond, TimeSpan Timeout)
{
    /// <summary>400 MB/s (a local disk's sequential rate, far above any WAN), at most two minutes.</summary>
    public static DiskRehashLimits Default { get; } = new(400_000_000, TimeSpan.FromMinutes(2));
}

/// <summary>What a re-hash proved and what it cost.</summary>
/// <param name="Differing">The blocks known in the map whose content differs now (or could not be read).</param>
/// <param name="KnownBlocks">Blocks the map knows (the ones compared).</param>
/// <param name="BytesRead">Bytes read from the image.</param>
/// <param name="Elapsed">Time taken, waiting for the host's turn included.</param>
public sealed record DiskRehashResult(DiskDoubt Differing, long KnownBlocks, long BytesRead, TimeSpan Elapsed)
{
    /// <summary>Read rate achieved, MB/s.</summary>
    public double MegabytesPerSecond => Elapsed.TotalSeconds > 0 ? BytesRead / 1e6 / Elapsed.TotalSeconds : 0;

    /// <summary>One line for logs and stats.</summary>
    public string Describe() =>
        $"{BytesRead >> 20} MiB read in {Elapsed.TotalSeconds:F1} s ({MegabytesPerSecond:F0} MB/s); {Differing.Describe()} of {KnownBlocks} known blocks differ";
}

/// <summary>
/// Proves which blocks of a saved disk map a retained raw image still holds, by reading it: the
/// image's identity (inode, size, mtime) cannot say that a block device was not written (its
/// timestamps do not move), nor what still holds in a file whose identity changed. The image is
/// read sequentially at disk speed and every block the map knows is hashed under the map's key;
/// a block whose hash differs (or that cannot be read) is in doubt, exactly like a block a failed
/// trip may have written (<see cref="DiskDoubt"/>), so both hosts drop it and nothing is elided
/// on a guess. One re-hash at a time per host (a lock file in the store), rate-capped,
/// cancellable, timed out.
/// </summary>
public static class DiskRehash
{
    private const int ChunkBytes = 4 << 20;
    private const string LockFileName = "rehash.lock";

    /// <summary>
    /// Why <paramref name="image"/> cannot be re-hashed, or null when it can: a raw image's bytes
    /// are the disk's and are read directly; a qcow2 image maps them through its own tables (and
    /// may name a backing file), so its content is read through qemu-nbd as the QEMU user
    /// (<see cref="QemuNbdExport"/>).
    /// </summary>
    public static string? Unsupported(DiskImageSpec image) =>
        image.Format is "raw" or "qcow2" ? null : $"a {image.Format} image cannot be re-hashed (only raw and qcow2 images are)";

    /// <summary>
    /// Reads <paramref name="image"/> and compares it with <paramref name="saved"/>. Returns the
    /// result, or null with the reason when the image cannot be read safely or in time (the
    /// caller then does not use the map). <paramref name="qemu"/>: the QEMU user, who may own a
    /// block device while libvirt lends it to a guest, and as whom a qcow2 image is read (without
    /// it a qcow2 image is not re-hashed). Cancelled with <paramref name="ct"/>.
    /// </summary>
    public static async Task<(DiskRehashResult? Result, string? Why)> ProveAsync(DiskImageSpec image, DiskBlockMap saved, string lockDirectory,
        DiskRehashLimits limits, NodeOwner? qemu, CancellationToken ct)
    {
        if (Unsupported(image) is { } why)
            return (null, why);
        if (image.Format != "raw" && qemu is null)
            return (null, $"a {image.Format} image is re-hashed only as the QEMU user (--qemu-user), who is not known here");
        var clock = Stopwatch.StartNew();
        using var budget = CancellationTokenSource.CreateLinkedTokenSource(ct);
        budget.CancelAfter(limits.Timeout);
        try
        {
            using var turn = await TakeTurnAsync(lockDirectory, budget.Token);
            (DiskDoubt Differing, long Bytes) compared;
            if (image.Format == "raw")
            {
                using var handle = Open(image, qemu);
                compared = await CompareAsync((offset, buffer, t) => ReadFullyAsync(handle, buffer, offset, t), saved, limits.BytesPerSecond, clock, budget.Token);
            }
            else
            {
                await using var export = await QemuNbdExport.StartAsync(image, qemu!.Value, budget.Token);
                compared = await CompareAsync(export.ReadAsync, saved, limits.BytesPerSecond, clock, budget.Token);
            }
            return (new DiskRehashResult(compared.Differing, saved.KnownCount, compared.Bytes, clock.Elapsed), null);
        }
        catch (OperationCanceledException) when (!ct.IsCancellationRequested)
        {
            return (null, $"the re-hash of {image.Path} did not finish within {limits.Timeout.TotalSeconds:F0} s");
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException or Nbd.NbdProtocolException)
        {
            return (null, $"cannot re-hash {image.Path}: {e.Message}");
        }
    }

    // A block device only along a path and with an owner nobody less privileged controls; a file
    // as its identity is read (the daemon named it from the domain XML), but never a FIFO or the like.
    private static SafeFileHandle Open(DiskImageSpec image, NodeOwner? qemu)
    {
        var status = DeviceNode.Stat(image.Path) ?? throw new IOException($"{image.Path}: cannot be read");
        if (status.IsBlockDevice)
            return DeviceNode.OpenBlockDeviceForReading(image.Path, qemu).Handle;
        if (!status.IsRegularFile)
            throw new UnauthorizedAccessException($"{image.Path}: neither a regular file nor a block device");
        var handle = File.OpenHandle(image.Path, FileMode.Open, FileAccess.Read, FileShare.ReadWrite | FileShare.Delete);
        if (!DeviceNode.FStat(handle).IsRegularFile)
        {
            handle.Dispose();
            throw new UnauthorizedAccessException($"{image.Path}: changed while it was opened");
        }
        return handle;
    }

    // The host's re-hashes run one after the other, so that the rate cap holds for the host.
    private static async Task<FileStream> TakeTurnAsync(string directory, CancellationToken ct)
    {
        Directory.CreateDirectory(directory);
        string path = Path.Combine(directory, LockFileName);
        while (true)
        {
            try
            {
                // FileShare.None takes flock(LOCK_EX | LOCK_NB) on Linux: released by the kernel if this process dies.
                return new FileStream(path, FileMode.OpenOrCreate, FileAccess.ReadWrite, FileShare.None);
            }
            catch (IOException) when (File.Exists(path))
            {
                await Task.Delay(200, ct);
            }
        }
    }

    // Reads up to the buffer's length at an offset of the disk; fewer bytes past its end, 0 where it cannot be read.
    private delegate ValueTask<int> ReadAt(long offset, Memory<byte> destination, CancellationToken ct);

    private static async Task<(DiskDoubt Differing, long Bytes)> CompareAsync(ReadAt read, DiskBlockMap saved, long bytesPerSecond,
        Stopwatch clock, CancellationToken ct)
    {
        int blockSize = saved.BlockSize;
        int blocksPerChunk = Math.Max(1, ChunkBytes / blockSize);
        var differing = new List<BlockRange>();
        long bytes = 0;
        var started = clock.Elapsed;
        var buffer = ArrayPool<byte>.Shared.Rent(blocksPerChunk * blockSize);
        try
        {
            for (long first = 0; first < saved.BlockCount; first += blocksPerChunk)
            {
                ct.ThrowIfCancellationRequested();
                long last = Math.Min(first + blocksPerChunk, saved.BlockCount);
                if (!AnyKnown(saved, first, last))
                    continue;
                long offset = first * blockSize;
                int want = (int)Math.Min((ulong)(last - first) * (ulong)blockSize, saved.ImageSize - (ulong)offset);
                int got = await read(offset, buffer.AsMemory(0, want), ct);
                bytes += got;
                for (long b = first; b < last; b++)
                {
                    if (!saved.TryGetHash(b, out var expected))
                        continue;
                    int at = (int)((b - first) * blockSize);
                    int length = DiskBlockHash.BlockLength(b, saved.ImageSize, blockSize);
                    // A block past the image's end (it shrank), or one that could not be read, cannot be proven to hold what the map says.
                    if (at + length > got || DiskBlockHash.Compute(buffer.AsSpan(at, length), saved.HashKey) != expected)
                        Add(differing, b);
                }
                await PaceAsync(bytes, bytesPerSecond, clock.Elapsed - started, ct);
            }
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(buffer);
        }
        return (DiskDoubt.Of(differing), bytes);
    }

    private static bool AnyKnown(DiskBlockMap map, long first, long last)
    {
        for (long b = first; b < last; b++)
        {
            if (map.TryGetHash(b, out _))
                return true;
        }
        return false;
    }

    private static void Add(List<BlockRange> ranges, long block)
    {
        if (ranges.Count > 0 && ranges[^1].End == block)
            ranges[^1] = new BlockRange(ranges[^1].First, ranges[^1].Count + 1);
        else
            ranges.Add(new BlockRange(block, 1));
    }

    private static async ValueTask<int> ReadFullyAsync(SafeFileHandle handle, Memory<byte> destination, long offset, CancellationToken ct)
    {
        int done = 0;
        while (done < destination.Length)
        {
            int n = await RandomAccess.ReadAsync(handle, destination[done..], offset + done, ct);
            if (n == 0) break;
            done += n;
        }
        return done;
    }

    private static Task PaceAsync(long bytes, long bytesPerSecond, TimeSpan elapsed, CancellationToken ct)
    {
        if (bytesPerSecond <= 0) return Task.CompletedTask;
        var due = TimeSpan.FromSeconds((double)bytes / bytesPerSecond) - elapsed;
        return due > TimeSpan.FromMilliseconds(1) ? Task.Delay(due, ct) : Task.CompletedTask;
    }
}
