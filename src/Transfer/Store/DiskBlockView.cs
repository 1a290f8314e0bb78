using System.IO.Hashing;

namespace BFMig.Transfer.Store;

/// <summary>
/// Read-only view of what one disk image holds, block by block: the hash of each block's
/// content, or "unknown". The NBD sender consults it to decide whether the receiver's image
/// already holds a block.
/// </summary>
public interface IDiskBlockView
{
    /// <summary>Bytes per block (a power of two; 64 KiB by default). The last block may be shorter.</summary>
    int BlockSize { get; }

    /// <summary>Seed for <see cref="XxHash128"/> used for every block hash in this view.</summary>
    long HashSeed { get; }

    /// <summary>Size of the image in bytes (as the NBD export reports it).</summary>
    ulong ImageSize { get; }

    /// <summary>Number of blocks, <c>ceil(ImageSize / BlockSize)</c>.</summary>
    long BlockCount { get; }

    /// <summary>The hash of block <paramref name="blockIndex"/>; false when unknown or out of range.</summary>
    bool TryGetHash(long blockIndex, out UInt128 hash);
}

/// <summary>How block content is hashed: XxHash128 of exactly the block's bytes (short tail block included).</summary>
public static class DiskBlockHash
{
    /// <summary>Default block size: QEMU's mirror granularity for NBD targets.</summary>
    public const int DefaultBlockSize = 64 * 1024;

    /// <summary>Hash of one block's content.</summary>
    public static UInt128 Compute(ReadOnlySpan<byte> block, long seed) => XxHash128.HashToUInt128(block, seed);

    /// <summary>Hash of <paramref name="length"/> zero bytes.</summary>
    public static UInt128 Zero(int length, long seed)
    {
        var zeroes = new byte[length];
        return XxHash128.HashToUInt128(zeroes, seed);
    }

    /// <summary>Number of blocks of <paramref name="blockSize"/> bytes covering <paramref name="size"/> bytes.</summary>
    public static long CountBlocks(ulong size, int blockSize) => (long)((size + (ulong)blockSize - 1) / (ulong)blockSize);

    /// <summary>Length of block <paramref name="index"/> in an image of <paramref name="size"/> bytes.</summary>
    public static int BlockLength(long index, ulong size, int blockSize) =>
        (int)Math.Min((ulong)blockSize, size - (ulong)index * (ulong)blockSize);
}
