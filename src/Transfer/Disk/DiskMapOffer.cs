using System.Buffers.Binary;
using BFMig.Transfer.Wire;

namespace BFMig.Transfer.Disk;

/// <summary>
/// A receiver's own map of an export, offered when the sender's view of it does not match (the
/// guest comes from a host this one never exchanged it with: A->B->C->A, issue 15). Both hosts
/// then use that map, minus the receiver's doubt, as the one they agree on: the receiver proved it
/// against its image as for a match (identity or re-hash), and the sender, which hashes under the
/// same key (the guest's map key continues from host to host), checks it against the reply's
/// digest. Block hashes are keyed MACs (<see cref="DiskBlockHash"/>), so a map in the open names
/// nothing a guest could forge.
/// <para>
/// Wire: <see cref="DiskChunk.ExportMap"/> chunks before the <see cref="DiskChunk.ExportReply"/>,
/// each <c>be64 image size, be32 block size, be64 first block, n x 16 hash (0 = unknown)</c>,
/// covering every block in order. The sender keeps only a map of its own disk's size, and what it
/// holds grows only with what it received.
/// </para>
/// </summary>
public sealed class DiskMapOffer
{
    /// <summary>Blocks per chunk (the chunk stays within <see cref="DiskChannel.MaxPayload"/>).</summary>
    public const int ChunkBlocks = 16000;
    private const int HeaderLength = 20;

    private readonly List<UInt128> _hashes = [];
    private readonly ulong? _sourceSize;
    private ulong _imageSize;
    private int _blockSize;
    private long _blockCount = -1;

    /// <param name="sourceSize">The size of the disk the sender mirrors (null: unknown). A map of another size is not used (nor kept).</param>
    public DiskMapOffer(ulong? sourceSize) => _sourceSize = sourceSize;

    /// <summary>Why the offer cannot be used (null while it can).</summary>
    public string? Unusable { get; private set; }

    /// <summary>The chunks that offer <paramref name="map"/>.</summary>
    public static IEnumerable<byte[]> Encode(DiskBlockMap map)
    {
        long first = 0;
        do
        {
            int n = (int)Math.Min(ChunkBlocks, map.BlockCount - first);
            var b = new byte[HeaderLength + n * 16];
            BinaryPrimitives.WriteUInt64BigEndian(b, map.ImageSize);
            BinaryPrimitives.WriteInt32BigEndian(b.AsSpan(8), map.BlockSize);
            BinaryPrimitives.WriteInt64BigEndian(b.AsSpan(12), first);
            for (int i = 0; i < n; i++)
                if (map.TryGetHash(first + i, out var h))
                    BinaryPrimitives.WriteUInt128LittleEndian(b.AsSpan(HeaderLength + i * 16), h);
            yield return b;
            first += n;
        }
        while (first < map.BlockCount);
    }

    /// <summary>Takes the next chunk; anything out of order, of another geometry or past the end is refused by name.</summary>
    public void Add(ReadOnlySpan<byte> p)
    {
        if (p.Length < HeaderLength || (p.Length - HeaderLength) % 16 != 0) throw Bad($"export map chunk of {p.Length} bytes is not a header and whole 16-byte hashes");
        ulong size = BinaryPrimitives.ReadUInt64BigEndian(p);
        int blockSize = BinaryPrimitives.ReadInt32BigEndian(p[8..]);
        long first = BinaryPrimitives.ReadInt64BigEndian(p[12..]);
        int n = (p.Length - HeaderLength) / 16;
        if (_blockCount < 0)
        {
            if (blockSize != DiskMapStore.BlockSize || !DiskBlockMap.CanDescribe(size, blockSize))
                throw Bad($"export map of {size} bytes in blocks of {blockSize} bytes cannot be a map of this host's (blocks of {DiskMapStore.BlockSize})");
            (_imageSize, _blockSize, _blockCount) = (size, blockSize, DiskBlockHash.CountBlocks(size, blockSize));
            if (_sourceSize != size)
                Unusable = $"the receiver offered a map of {size} bytes for a disk of {(_sourceSize is { } s ? $"{s} bytes" : "unknown size")} here";
        }
        else if (size != _imageSize || blockSize != _blockSize)
        {
            throw Bad($"export map chunk of another geometry ({size} bytes, blocks of {blockSize}) than its first ({_imageSize}, {_blockSize})");
        }
        if (first != _received) throw Bad($"export map chunk from block {first}, expected {_received}");
        if (n > _blockCount - first) throw Bad($"export map chunk of {n} blocks overruns the map's {_blockCount} at block {first}");
        _received = first + n;
        if (Unusable is not null) return;
        for (int i = 0; i < n; i++)
            _hashes.Add(BinaryPrimitives.ReadUInt128LittleEndian(p[(HeaderLength + i * 16)..]));
    }

    private long _received;

    /// <summary>The offered map, hashed under <paramref name="key"/> (the sender's, which the receiver shares), or null when chunks are missing.</summary>
    public DiskBlockMap? Complete(DiskHashKey key)
    {
        if (_blockCount < 0 || _received != _blockCount || Unusable is not null) return null;
        var map = new DiskBlockMap(_imageSize, _blockSize, key);
        for (int i = 0; i < _hashes.Count; i++)
            if (_hashes[i] != UInt128.Zero) map.Set(i, _hashes[i]);
        return map;
    }

    private static PeerProtocolException Bad(string what) => new($"disk channel: {what}");
}
