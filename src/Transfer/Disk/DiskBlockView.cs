using System.Buffers.Binary;
using System.Security.Cryptography;

namespace BFMig.Transfer.Disk;

/// <summary>
/// Read-only view of what one disk image holds, block by block: the hash of each block's
/// content, or "unknown". The NBD sender consults it to decide whether the receiver's image
/// already holds a block.
/// </summary>
public interface IDiskBlockView
{
    /// <summary>Bytes per block (a power of two; 64 KiB by default). The last block may be shorter.</summary>
    int BlockSize { get; }

    /// <summary>Key of every block hash in this view.</summary>
    DiskHashKey HashKey { get; }

    /// <summary>Size of the image in bytes (as the NBD export reports it).</summary>
    ulong ImageSize { get; }

    /// <summary>Number of blocks, <c>ceil(ImageSize / BlockSize)</c>.</summary>
    long BlockCount { get; }

    /// <summary>The hash of block <paramref name="blockIndex"/>; false when unknown or out of range.</summary>
    bool TryGetHash(long blockIndex, out UInt128 hash);
}

/// <summary>
/// How block content is hashed: HMAC-SHA256 of exactly the block's bytes (short tail block
/// included) under the guest's <see cref="DiskHashKey"/>, truncated to 128 bits. The sender elides
/// a write when this hash equals the one recorded for what the receiver holds, without the
/// receiver's bytes at hand, so the hash itself is the identity: it must be a keyed PRF whose key
/// a guest never sees, or a guest could craft a block that collides with one the receiver holds
/// and have its own write dropped in favour of the old content (an unkeyed or publicly seeded
/// hash such as XXH3 allows exactly that).
/// </summary>
public static class DiskBlockHash
{
    /// <summary>Default block size: QEMU's mirror granularity for NBD targets.</summary>
    public const int DefaultBlockSize = 64 * 1024;

    /// <summary>Hash of one block's content.</summary>
    public static UInt128 Compute(ReadOnlySpan<byte> block, DiskHashKey key)
    {
        Span<byte> mac = stackalloc byte[32];
        HMACSHA256.HashData(key.Bytes, block, mac);
        return BinaryPrimitives.ReadUInt128LittleEndian(mac);
    }

    /// <summary>Hash of <paramref name="length"/> zero bytes.</summary>
    public static UInt128 Zero(int length, DiskHashKey key) => Compute(new byte[length], key);

    /// <summary>Number of blocks of <paramref name="blockSize"/> bytes covering <paramref name="size"/> bytes.</summary>
    public static long CountBlocks(ulong size, int blockSize) => (long)((size + (ulong)blockSize - 1) / (ulong)blockSize);

    /// <summary>Length of block <paramref name="index"/> in an image of <paramref name="size"/> bytes.</summary>
    public static int BlockLength(long index, ulong size, int blockSize) =>
        (int)Math.Min((ulong)blockSize, size - (ulong)index * (ulong)blockSize);
}

/// <summary>
/// The secret key of a guest's disk block hashes (<see cref="DiskBlockHash"/>): 32 random bytes
/// made by the sender of the first trip that keeps maps, kept in both hosts' maps (root-only
/// files) and carried only inside the secured peer connection (TLS, or frames sealed under the
/// pre-shared key), in the disk channel's export hello. Nothing a guest can see derives it.
/// </summary>
public sealed class DiskHashKey : IEquatable<DiskHashKey>
{
    /// <summary>Key length in bytes.</summary>
    public const int Length = 32;

    private readonly byte[] _key;

    /// <summary>A key from its bytes (exactly <see cref="Length"/>).</summary>
    public DiskHashKey(ReadOnlySpan<byte> key)
    {
        if (key.Length != Length) throw new ArgumentException($"disk hash key of {key.Length} bytes, expected {Length}", nameof(key));
        _key = key.ToArray();
    }

    /// <summary>A fresh random key.</summary>
    public static DiskHashKey NewRandom() => new(RandomNumberGenerator.GetBytes(Length));

    /// <summary>
    /// The all-zero key: for maps built outside a trip (tools, tests) that are never compared with
    /// a peer's. Never used by a transfer: it would be no secret.
    /// </summary>
    public static DiskHashKey Unkeyed { get; } = new(new byte[Length]);

    internal ReadOnlySpan<byte> Bytes => _key;

    /// <summary>Writes the key (to a map file or the export hello).</summary>
    public void CopyTo(Span<byte> destination) => _key.CopyTo(destination);

    /// <summary>A 64-bit name of the key that reveals nothing about it (for digests).</summary>
    public ulong Id
    {
        get
        {
            Span<byte> mac = stackalloc byte[32];
            HMACSHA256.HashData(_key, "bfmig disk key id"u8, mac);
            return BinaryPrimitives.ReadUInt64LittleEndian(mac);
        }
    }

    /// <inheritdoc/>
    public bool Equals(DiskHashKey? other) => other is not null && CryptographicOperations.FixedTimeEquals(_key, other._key);

    /// <inheritdoc/>
    public override bool Equals(object? obj) => Equals(obj as DiskHashKey);

    /// <inheritdoc/>
    public override int GetHashCode() => (int)Id;
}
