using System.Buffers.Binary;
using System.IO.Hashing;

namespace BFMig.Transfer.Disk;

/// <summary>
/// The block-hash map of one disk image: per block a 16-byte keyed hash (<see cref="DiskBlockHash"/>) or "unknown", plus the
/// identity of the image it describes. It is the retained view the NBD sender consults
/// (<see cref="IDiskBlockView"/>) and the sink the sender/receiver record a trip into
/// (<see cref="IDiskRecorder"/>). Not thread-safe: one writer at a time.
/// </summary>
public sealed partial class DiskBlockMap : IDiskBlockView, IDiskRecorder
{
    /// <summary>Largest number of blocks a map may hold (16 TiB at 64 KiB blocks; 4 GiB of hashes).</summary>
    public const long MaxBlockCount = 1L << 28;

    private UInt128[] _hashes;
    private ulong[] _known;

    /// <summary>Creates a map with every block unknown.</summary>
    public DiskBlockMap(ulong imageSize, int blockSize = DiskBlockHash.DefaultBlockSize, DiskHashKey? hashKey = null, DiskImageIdentity? identity = null)
    {
        ValidateGeometry(imageSize, blockSize);
        ImageSize = imageSize;
        BlockSize = blockSize;
        HashKey = hashKey ?? DiskHashKey.Unkeyed;
        Identity = identity;
        BlockCount = DiskBlockHash.CountBlocks(imageSize, blockSize);
        _hashes = new UInt128[BlockCount];
        _known = new ulong[(BlockCount + 63) / 64];
    }

    /// <inheritdoc/>
    public int BlockSize { get; private set; }

    /// <inheritdoc/>
    public DiskHashKey HashKey { get; private set; }

    /// <inheritdoc/>
    public ulong ImageSize { get; private set; }

    /// <inheritdoc/>
    public long BlockCount { get; private set; }

    /// <summary>The image file this map describes, when known.</summary>
    public DiskImageIdentity? Identity { get; set; }

    /// <summary>True after <see cref="IDiskRecorder.EndTrip"/> reported an unclean end; such a map must not be used for elision.</summary>
    public bool LastTripUnclean { get; private set; }

    /// <summary>Number of blocks whose hash is known.</summary>
    public long KnownCount
    {
        get
        {
            long n = 0;
            foreach (ulong word in _known)
                n += (long)ulong.PopCount(word);
            return n;
        }
    }

    /// <inheritdoc/>
    public bool TryGetHash(long blockIndex, out UInt128 hash)
    {
        if ((ulong)blockIndex >= (ulong)BlockCount || (_known[blockIndex >> 6] & (1UL << (int)(blockIndex & 63))) == 0)
        {
            hash = default;
            return false;
        }
        hash = _hashes[blockIndex];
        return true;
    }

    /// <summary>Sets block <paramref name="blockIndex"/> to <paramref name="hash"/> (null = unknown).</summary>
    public void Set(long blockIndex, UInt128? hash)
    {
        ArgumentOutOfRangeException.ThrowIfGreaterThanOrEqual((ulong)blockIndex, (ulong)BlockCount, nameof(blockIndex));
        ulong bit = 1UL << (int)(blockIndex & 63);
        if (hash is { } h)
        {
            _hashes[blockIndex] = h;
            _known[blockIndex >> 6] |= bit;
        }
        else
        {
            _hashes[blockIndex] = default;
            _known[blockIndex >> 6] &= ~bit;
        }
    }

    /// <summary>Marks every block unknown.</summary>
    public void Invalidate()
    {
        Array.Clear(_hashes);
        Array.Clear(_known);
    }

    /// <summary>
    /// Digest over geometry, the key's id and every block's state: two maps have the same digest exactly
    /// when they describe the same content with the same knowledge. Identity is not included
    /// (the two hosts' files differ in path and inode).
    /// </summary>
    public UInt128 ComputeDigest()
    {
        var hasher = new XxHash128();
        Span<byte> head = stackalloc byte[24];
        BinaryPrimitives.WriteUInt64LittleEndian(head, ImageSize);
        BinaryPrimitives.WriteInt32LittleEndian(head[8..], BlockSize);
        BinaryPrimitives.WriteUInt64LittleEndian(head[12..], HashKey.Id);
        BinaryPrimitives.WriteInt32LittleEndian(head[20..], FileVersion);
        hasher.Append(head);
        hasher.Append(System.Runtime.InteropServices.MemoryMarshal.AsBytes(_known.AsSpan()));
        hasher.Append(System.Runtime.InteropServices.MemoryMarshal.AsBytes(_hashes.AsSpan()));
        return hasher.GetCurrentHashAsUInt128();
    }

    /// <summary>A copy of this map.</summary>
    public DiskBlockMap Clone()
    {
        var copy = new DiskBlockMap(ImageSize, BlockSize, HashKey, Identity) { LastTripUnclean = LastTripUnclean };
        _hashes.CopyTo(copy._hashes, 0);
        _known.CopyTo(copy._known, 0);
        return copy;
    }

    /// <inheritdoc/>
    void IDiskRecorder.BeginTrip(ulong imageSize, int blockSize, DiskHashKey hashKey)
    {
        ValidateGeometry(imageSize, blockSize);
        ImageSize = imageSize;
        BlockSize = blockSize;
        HashKey = hashKey;
        BlockCount = DiskBlockHash.CountBlocks(imageSize, blockSize);
        _hashes = new UInt128[BlockCount];
        _known = new ulong[(BlockCount + 63) / 64];
        LastTripUnclean = true;
    }

    /// <inheritdoc/>
    void IDiskRecorder.RecordBlock(long blockIndex, UInt128? hash) => Set(blockIndex, hash);

    /// <inheritdoc/>
    void IDiskRecorder.EndTrip(bool clean) => LastTripUnclean = !clean;

    /// <summary>
    /// True when a map of <paramref name="blockSize"/> blocks can describe an image of
    /// <paramref name="imageSize"/> bytes (at most <see cref="MaxBlockCount"/> blocks). An NBD
    /// server may declare any export size: who reports a trip checks this first.
    /// </summary>
    public static bool CanDescribe(ulong imageSize, int blockSize) =>
        blockSize > 0 && imageSize <= (ulong)MaxBlockCount * (ulong)blockSize;

    private static void ValidateGeometry(ulong imageSize, int blockSize)
    {
        if (blockSize < 512 || blockSize > (64 << 20) || !int.IsPow2(blockSize))
            throw new ArgumentOutOfRangeException(nameof(blockSize), blockSize, "block size must be a power of two between 512 B and 64 MiB");
        if (!CanDescribe(imageSize, blockSize))
            throw new ArgumentOutOfRangeException(nameof(imageSize), imageSize, $"more than {MaxBlockCount} blocks");
    }
}
