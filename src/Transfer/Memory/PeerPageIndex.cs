using System.Buffers.Binary;
using System.Text;
using BFMig.Transfer.Disk;
using BFMig.Transfer.Store;
using BFMig.Transfer.Wire;

namespace BFMig.Transfer.Memory;

/// <summary>
/// What a receiver that is not in step with the sender still holds of the guest's memory: its
/// departure snapshot from an earlier trip, described page by page so that a sender that never
/// exchanged the guest with it (A->B->C->A: C and A) can elide what is unchanged (issue 15).
/// <para>
/// Identity: the sender does not hold these bytes, so the hash <i>is</i> the identity here (as for
/// disk blocks, <see cref="DiskBlockHash"/>): HMAC-SHA256 truncated to 128 bits under a key the
/// receiver draws for this trip alone. The key lives only in the two helpers and crosses only
/// inside the sealed or TLS channel, so a guest cannot compute a single MAC, let alone craft a
/// page whose MAC equals that of a page the receiver holds (a key seen by an earlier trip is of
/// no use to the next); the store's XXH3 index, whose seed crosses in the hello, is never sent as
/// an identity. The receiver
/// computes each entry from the bytes it will keep (and leaves out any page whose bytes disagree
/// with its own index), so an elided page is rebuilt from exactly what was hashed.
/// </para>
/// <para>
/// Wire (after a <see cref="HelloReply"/> with <see cref="HelloReply.IndexFollows"/>, protocol 6):
/// one <see cref="FrameType.PageIndexHead"/> <c>32 key, be64 store seed, be64 generation, u8 block
/// count, per block u8 name length + name, be64 used length</c>; then <see
/// cref="FrameType.PageIndexPages"/> frames <c>be32 block, be64 first page, n x 16 MAC (0 =
/// unknown)</c> covering every page of every block in order, nothing else.
/// </para>
/// </summary>
public sealed class PeerPageIndex
{
    /// <summary>Pages per <see cref="FrameType.PageIndexPages"/> frame (512 KiB of MACs).</summary>
    public const int ChunkPages = 32 << 10;

    /// <summary>Most RAM blocks an index may name (a guest has a handful).</summary>
    public const int MaxBlocks = 255;

    private readonly Dictionary<string, UInt128[]> _macs;

    private PeerPageIndex(DiskHashKey key, ulong seed, ulong generation, Dictionary<string, UInt128[]> macs)
    {
        Key = key;
        Seed = seed;
        Generation = generation;
        _macs = macs;
    }

    /// <summary>The trip's MAC key (drawn by the receiver, secret inside the sealed or TLS channel).</summary>
    public DiskHashKey Key { get; }

    /// <summary>The receiver's page-hash seed: the trip records under it, so the pages it keeps keep their index entries.</summary>
    public ulong Seed { get; }

    /// <summary>The receiver's store generation as it sent the index: the trip's new generation is above it, and the log names it.</summary>
    public ulong Generation { get; }

    /// <summary>Pages with a known MAC.</summary>
    public long KnownPages => _macs.Values.Sum(m => m.LongLength - m.LongCount(h => h == UInt128.Zero));

    /// <summary>The MAC of a page's content under this index's key.</summary>
    public UInt128 Mac(ReadOnlySpan<byte> page) => DiskBlockHash.Compute(page, Key);

    /// <summary>
    /// The MACs for each block of the stream's layout, by position; null for a block the receiver
    /// holds under another length or not at all (its pages are sent as on a first trip).
    /// </summary>
    public UInt128[]?[] ForLayout(IReadOnlyList<RamBlockInfo> blocks) => [.. blocks.Select(b => MacsOf(b.Name, b.PageCount))];

    /// <summary>The same for the blocks of <paramref name="store"/>, in its trip's layout.</summary>
    public UInt128[]?[] ForLayout(MemoryStore store) => [.. Enumerable.Range(0, store.BlockCount).Select(b => MacsOf(store.BlockName(b), store.PageCount(b)))];

    private UInt128[]? MacsOf(string name, long pages) => _macs.TryGetValue(name, out var m) && m.LongLength == pages ? m : null;

    /// <summary>
    /// Receiver: draws a key and sends the MACs of every page the store vouches for
    /// (<see cref="MemoryStore.Vouch"/>); returns how many pages it describes. The store must be
    /// open and not in a trip. Nothing here fails the migration: a store it cannot describe (more
    /// blocks than a head names) sends an empty index, a run it cannot read sends no MACs.
    /// </summary>
    public static async Task<long> SendAsync(MemoryStore store, FrameWriter writer, CancellationToken ct)
    {
        var key = DiskHashKey.NewRandom();
        int blocks = store.BlockCount <= MaxBlocks ? store.BlockCount : 0;
        var head = new MemoryStream();
        head.Write(key.Bytes);
        Span<byte> u64 = stackalloc byte[8];
        BinaryPrimitives.WriteUInt64BigEndian(u64, store.State.Seed);
        head.Write(u64);
        BinaryPrimitives.WriteUInt64BigEndian(u64, store.State.Generation);
        head.Write(u64);
        head.WriteByte((byte)blocks);
        for (int b = 0; b < blocks; b++)
        {
            // RAMBlock names come from QEMU's stream, which gives them a u8 length too.
            var name = Encoding.UTF8.GetBytes(store.BlockName(b));
            head.WriteByte((byte)name.Length);
            head.Write(name);
            BinaryPrimitives.WriteUInt64BigEndian(u64, (ulong)store.PageCount(b) << QemuFormat.PageShift);
            head.Write(u64);
        }
        await writer.WriteAsync(FrameType.PageIndexHead, head.ToArray(), compress: false, ct);

        var zeroMac = DiskBlockHash.Compute(new byte[QemuFormat.PageSize], key);
        var frame = new byte[12 + ChunkPages * 16];
        var macs = new UInt128[ChunkPages];
        long known = 0;
        for (int b = 0; b < blocks; b++)
        {
            long count = store.PageCount(b);
            for (long first = 0; first < count; first += ChunkPages)
            {
                int n = (int)Math.Min(ChunkPages, count - first);
                var run = macs.AsSpan(0, n);
                try
                {
                    store.Vouch(b, first, run, key, zeroMac);
                }
                catch (IOException e)
                {
                    TransferLog.Note($"bfmig-transfer: pages {first}-{first + n - 1} of block {b} unreadable ({e.Message}): left out of the index");
                    run.Clear();
                }
                BinaryPrimitives.WriteUInt32BigEndian(frame, (uint)b);
                BinaryPrimitives.WriteUInt64BigEndian(frame.AsSpan(4), (ulong)first);
                for (int i = 0; i < n; i++)
                {
                    BinaryPrimitives.WriteUInt128LittleEndian(frame.AsSpan(12 + i * 16), run[i]);
                    if (run[i] != UInt128.Zero) known++;
                }
                await writer.WriteAsync(FrameType.PageIndexPages, frame.AsMemory(0, 12 + n * 16), compress: true, ct);
            }
        }
        return known;
    }

    /// <summary>
    /// Sender: reads the index that follows the hello reply. At most <paramref name="maxRamBytes"/>
    /// of RAM may be described (nothing is allocated before the head is checked against it), and
    /// anything out of order, overlapping, short or extra is refused by name.
    /// </summary>
    public static async Task<PeerPageIndex> ReadAsync(FrameReader reader, long maxRamBytes, CancellationToken ct)
    {
        var head = await Next(reader, FrameType.PageIndexHead, "index head", ct);
        var (key, seed, generation, layout) = DecodeHead(head.Span, maxRamBytes);
        var macs = new Dictionary<string, UInt128[]>(StringComparer.Ordinal);
        for (int b = 0; b < layout.Count; b++)
        {
            var array = new UInt128[layout[b].PageCount];
            for (long first = 0; first < array.LongLength;)
            {
                var p = (await Next(reader, FrameType.PageIndexPages, $"index of block {b} from page {first}", ct)).Span;
                if (p.Length < 12 + 16 || (p.Length - 12) % 16 != 0) throw new PeerProtocolException($"page index frame of {p.Length} bytes is not a header and whole 16-byte entries");
                uint block = BinaryPrimitives.ReadUInt32BigEndian(p);
                ulong at = BinaryPrimitives.ReadUInt64BigEndian(p[4..]);
                long n = (p.Length - 12) / 16;
                if (block != b || at != (ulong)first) throw new PeerProtocolException($"page index frame for block {block} page {at}, expected block {b} page {first}");
                if (n > array.LongLength - first) throw new PeerProtocolException($"page index frame of {n} pages overruns block {b} ({array.LongLength} pages) at page {first}");
                for (int i = 0; i < n; i++)
                    array[first + i] = BinaryPrimitives.ReadUInt128LittleEndian(p[(12 + i * 16)..]);
                first += n;
            }
            macs[layout[b].Name] = array;
        }
        return new PeerPageIndex(key, seed, generation, macs);
    }

    private static (DiskHashKey Key, ulong Seed, ulong Generation, List<RamBlockInfo> Layout) DecodeHead(ReadOnlySpan<byte> p, long maxRamBytes)
    {
        const int fixedLength = DiskHashKey.Length + 8 + 8 + 1;
        if (p.Length < fixedLength) throw new PeerProtocolException($"page index head of {p.Length} bytes is shorter than {fixedLength}");
        var key = new DiskHashKey(p[..DiskHashKey.Length]);
        ulong seed = BinaryPrimitives.ReadUInt64BigEndian(p[DiskHashKey.Length..]);
        ulong generation = BinaryPrimitives.ReadUInt64BigEndian(p[(DiskHashKey.Length + 8)..]);
        int count = p[fixedLength - 1];
        int pos = fixedLength;
        var layout = new List<RamBlockInfo>(count);
        long total = 0;
        for (int b = 0; b < count; b++)
        {
            if (pos >= p.Length) throw new PeerProtocolException($"page index head truncated before block {b}");
            int len = p[pos++];
            if (len == 0 || p.Length - pos < len + 8) throw new PeerProtocolException($"page index head truncated or empty in block {b}'s name");
            string name = Encoding.UTF8.GetString(p.Slice(pos, len));
            pos += len;
            ulong used = BinaryPrimitives.ReadUInt64BigEndian(p[pos..]);
            pos += 8;
            if (used == 0 || used % QemuFormat.PageSize != 0) throw new PeerProtocolException($"page index block '{name}' of {used} bytes is not whole pages");
            if (used > (ulong)Math.Max(0, maxRamBytes - total)) throw new PeerProtocolException($"page index describes more than the {maxRamBytes} bytes of RAM this host takes");
            if (layout.Any(l => l.Name == name)) throw new PeerProtocolException($"page index names block '{name}' twice");
            total += (long)used;
            layout.Add(new RamBlockInfo(name, (long)used));
        }
        if (pos != p.Length) throw new PeerProtocolException($"page index head has {p.Length - pos} bytes after its last block");
        return (key, seed, generation, layout);
    }

    private static async Task<ReadOnlyMemory<byte>> Next(FrameReader reader, FrameType type, string what, CancellationToken ct)
    {
        var frame = await reader.ReadAsync(ct) ?? throw new PeerProtocolException($"peer closed the connection before the {what}");
        if (frame.Type == FrameType.Abort) throw new PeerProtocolException($"peer aborted before the {what}: {Handshake.AbortReason(frame.Payload.Span)}");
        if (frame.Type != type) throw new PeerProtocolException($"expected the {what}, got a {frame.Type} frame");
        return frame.Payload;
    }
}
