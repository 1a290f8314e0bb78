using System.Diagnostics;
using BFMig.Transfer.Disk;
using Xunit;

namespace BFMig.Transfer.Tests.Nbd;

/// <summary>
/// DiskRehash on real raw files: what it proves, and its bounds (one per host at a time, the
/// rate cap, the time limit, cancellation, formats it cannot read).
/// </summary>
public sealed class DiskRehashTests : IDisposable
{
    private const int Block = DiskMapStore.BlockSize;
    private readonly string _dir = Directory.CreateTempSubdirectory("bfmig-rehash-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    // A raw image of BLOCKS random blocks and its map (every block known) under a fresh key.
    private (DiskImageSpec Image, DiskBlockMap Map) Image(int blocks, int tail = 0)
    {
        string path = Path.Combine(_dir, "disk.raw");
        var bytes = new byte[blocks * Block + tail];
        new Random(5).NextBytes(bytes);
        File.WriteAllBytes(path, bytes);
        var map = new DiskBlockMap((ulong)bytes.Length, Block, DiskHashKey.NewRandom());
        for (long b = 0; b < map.BlockCount; b++)
        {
            int length = DiskBlockHash.BlockLength(b, map.ImageSize, Block);
            map.Set(b, DiskBlockHash.Compute(bytes.AsSpan((int)(b * Block), length), map.HashKey));
        }
        return (new DiskImageSpec(path, "raw"), map);
    }

    private static void Write(DiskImageSpec image, long offset, byte value, int length)
    {
        using var f = new FileStream(image.Path, FileMode.Open, FileAccess.Write);
        f.Position = offset;
        f.Write(Enumerable.Repeat(value, length).ToArray());
    }

    private static readonly DiskRehashLimits Fast = new(0, TimeSpan.FromSeconds(30));

    [Fact]
    public async Task Exactly_the_blocks_that_differ_are_in_doubt_and_unknown_blocks_are_not_read()
    {
        var (image, map) = Image(200, tail: 1000);
        Write(image, 3 * Block + 17, 0x5a, 1);
        Write(image, 99L * Block, 0xa5, 2 * Block);
        // The short last block counts too.
        Write(image, 200L * Block + 999, 0x11, 1);
        for (long b = 128; b < 192; b++)
            map.Set(b, null);
        var (result, why) = await DiskRehash.ProveAsync(image, map, _dir, Fast, null, CancellationToken.None);
        Assert.Null(why);
        Assert.NotNull(result);
        Assert.Equal([new BlockRange(3, 1), new BlockRange(99, 2), new BlockRange(200, 1)], result.Differing.Ranges);
        Assert.Equal(201 - 64, result.KnownBlocks);
        // One 4 MiB chunk (blocks 128-191) held no known block and was skipped.
        Assert.Equal(136L * Block + 1000, result.BytesRead);
    }

    [Fact]
    public async Task A_shrunk_image_doubts_what_lies_past_its_end()
    {
        var (image, map) = Image(80);
        using (var f = new FileStream(image.Path, FileMode.Open))
            f.SetLength(70L * Block);
        var (result, _) = await DiskRehash.ProveAsync(image, map, _dir, Fast, null, CancellationToken.None);
        Assert.Equal([new BlockRange(70, 10)], result!.Differing.Ranges);
    }

    [Fact]
    public async Task Other_formats_and_non_files_are_not_rehashed()
    {
        var (image, map) = Image(4);
        var (result, why) = await DiskRehash.ProveAsync(image with { Format = "vmdk" }, map, _dir, Fast, null, CancellationToken.None);
        Assert.Null(result);
        Assert.Contains("cannot be re-hashed", why);
        (result, why) = await DiskRehash.ProveAsync(new DiskImageSpec("/dev/null", "raw"), map, _dir, Fast, null, CancellationToken.None);
        Assert.Null(result);
        Assert.Contains("neither a regular file nor a block device", why);
    }

    [Fact]
    public async Task The_rate_cap_holds()
    {
        var (image, map) = Image(128);
        var clock = Stopwatch.StartNew();
        var (result, _) = await DiskRehash.ProveAsync(image, map, _dir, new DiskRehashLimits(16_000_000, TimeSpan.FromSeconds(30)), null, CancellationToken.None);
        // 8 MiB at 16 MB/s: at least about half a second.
        Assert.True(clock.Elapsed >= TimeSpan.FromSeconds(0.45), $"took {clock.Elapsed}");
        Assert.True(result!.MegabytesPerSecond <= 17, result.Describe());
    }

    [Fact]
    public async Task One_rehash_per_host_at_a_time_and_the_time_limit_gives_up()
    {
        var (image, map) = Image(8);
        var lockPath = Path.Combine(_dir, "rehash.lock");
        using (new FileStream(lockPath, FileMode.OpenOrCreate, FileAccess.ReadWrite, FileShare.None))
        {
            // Another re-hash holds the host's turn: this one waits, then gives up at its limit.
            var (result, why) = await DiskRehash.ProveAsync(image, map, _dir, new DiskRehashLimits(0, TimeSpan.FromMilliseconds(600)), null, CancellationToken.None);
            Assert.Null(result);
            Assert.Contains("did not finish within", why);
        }
        var (after, _) = await DiskRehash.ProveAsync(image, map, _dir, Fast, null, CancellationToken.None);
        Assert.True(after!.Differing.IsEmpty);
    }

    [Fact]
    public async Task Cancellation_is_not_a_reason_but_a_cancellation()
    {
        var (image, map) = Image(8);
        using var cts = new CancellationTokenSource();
        await cts.CancelAsync();
        await Assert.ThrowsAnyAsync<OperationCanceledException>(() => DiskRehash.ProveAsync(image, map, _dir, Fast, null, cts.Token));
    }
}
