using System.Buffers.Binary;
using System.IO.Hashing;
using BFMig.Native.Linux;

namespace BFMig.Transfer.Disk;

/// <summary>Blocks [<see cref="First"/>, <see cref="First"/> + <see cref="Count"/>) of a disk map.</summary>
public readonly record struct BlockRange(long First, long Count)
{
    /// <summary>One past the last block.</summary>
    public long End => First + Count;
}

/// <summary>
/// The blocks of a saved disk map that may no longer describe the image on the receiving host:
/// those a trip since the map was saved may have written there (the map itself is never changed by
/// a trip that does not commit). <see cref="Whole"/>: every block (the image was written by
/// something other than a BFMig trip, or the journal cannot be read). A map minus its doubt is
/// still true block for block, so a failed trip costs the next one only what it left in doubt.
/// </summary>
public sealed class DiskDoubt
{
    /// <summary>Most ranges a doubt keeps (and a hello carries); beyond that the whole map is in doubt.</summary>
    public const int MaxRanges = 4096;

    private DiskDoubt(bool whole, IReadOnlyList<BlockRange> ranges)
    {
        Whole = whole;
        Ranges = ranges;
    }

    /// <summary>No block in doubt.</summary>
    public static DiskDoubt None { get; } = new(false, []);

    /// <summary>Every block in doubt.</summary>
    public static DiskDoubt All { get; } = new(true, []);

    /// <summary>Every block is in doubt.</summary>
    public bool Whole { get; }

    /// <summary>Sorted, disjoint, non-adjacent ranges in doubt (empty when <see cref="Whole"/>).</summary>
    public IReadOnlyList<BlockRange> Ranges { get; }

    /// <summary>True when no block is in doubt.</summary>
    public bool IsEmpty => !Whole && Ranges.Count == 0;

    /// <summary>Blocks in doubt (<see cref="long.MaxValue"/> when whole).</summary>
    public long BlockCount => Whole ? long.MaxValue : Ranges.Sum(r => r.Count);

    /// <summary>The doubt of <paramref name="ranges"/> (any order, overlaps allowed; empty ranges dropped).</summary>
    public static DiskDoubt Of(IEnumerable<BlockRange> ranges)
    {
        var sorted = ranges.Where(r => r.Count > 0 && r.First >= 0).OrderBy(r => r.First).ToList();
        var merged = new List<BlockRange>(sorted.Count);
        foreach (var r in sorted)
        {
            if (merged.Count > 0 && r.First <= merged[^1].End)
                merged[^1] = new BlockRange(merged[^1].First, Math.Max(merged[^1].End, r.End) - merged[^1].First);
            else
                merged.Add(r);
        }
        return merged.Count > MaxRanges ? All : new DiskDoubt(false, merged);
    }

    /// <summary>Blocks in doubt in either.</summary>
    public DiskDoubt Union(DiskDoubt other) => Whole || other.Whole ? All : Of(Ranges.Concat(other.Ranges));

    /// <summary>
    /// A copy of <paramref name="map"/> with every block in doubt unknown (null when the whole map
    /// is in doubt).
    /// </summary>
    public DiskBlockMap? Apply(DiskBlockMap map)
    {
        if (Whole) return null;
        var view = map.Clone();
        foreach (var r in Ranges)
        {
            for (long b = r.First; b < Math.Min(r.End, view.BlockCount); b++)
                view.Set(b, null);
        }
        return view;
    }

    /// <summary>Short text for logs and stats.</summary>
    public string Describe() => Whole ? "every block" : $"{BlockCount} blocks in {Ranges.Count} ranges";

    /// <summary>Wire form: <c>u8 whole, u32 count, count x (u64 first, u64 count)</c>, big-endian.</summary>
    public byte[] Encode()
    {
        var b = new byte[5 + 16 * Ranges.Count];
        b[0] = Whole ? (byte)1 : (byte)0;
        BinaryPrimitives.WriteInt32BigEndian(b.AsSpan(1), Ranges.Count);
        for (int i = 0; i < Ranges.Count; i++)
        {
            BinaryPrimitives.WriteInt64BigEndian(b.AsSpan(5 + 16 * i), Ranges[i].First);
            BinaryPrimitives.WriteInt64BigEndian(b.AsSpan(13 + 16 * i), Ranges[i].Count);
        }
        return b;
    }

    /// <summary>Decodes <see cref="Encode"/>'s form, which must fill <paramref name="p"/> exactly; null when malformed.</summary>
    public static DiskDoubt? Decode(ReadOnlySpan<byte> p)
    {
        if (p.Length < 5 || p[0] > 1) return null;
        int count = BinaryPrimitives.ReadInt32BigEndian(p[1..]);
        if (count < 0 || count > MaxRanges || p.Length != 5 + 16L * count) return null;
        if (p[0] == 1) return count == 0 ? All : null;
        var ranges = new BlockRange[count];
        for (int i = 0; i < count; i++)
        {
            long first = BinaryPrimitives.ReadInt64BigEndian(p[(5 + 16 * i)..]);
            long n = BinaryPrimitives.ReadInt64BigEndian(p[(13 + 16 * i)..]);
            if (first < 0 || n <= 0 || n > DiskBlockMap.MaxBlockCount || first > DiskBlockMap.MaxBlockCount) return null;
            ranges[i] = new BlockRange(first, n);
        }
        return Of(ranges);
    }
}

/// <summary>
/// The in-flux journal of a disk map, <c>EXPORT.map.influx</c>: which blocks trips since the map
/// was saved may have written on the receiving host's image. Each host keeps its own: the sender
/// journals a range before it forwards the first write into it, the receiver before that write
/// reaches its NBD server, so the receiver's doubt is always within the sender's, and the next
/// trip's hello unites both. Crash-consistent: a range is appended and fsynced before any write
/// into it goes out (coarsely, per <see cref="RegionBlocks"/> blocks, to keep fsyncs rare); a
/// helper that ends without committing rewrites the journal with the exact blocks. Anything that
/// cannot be read as a journal (the 8-byte marker of older helpers and of bfmigd's invalidation,
/// a damaged record) puts the whole map in doubt.
/// </summary>
public sealed class DiskDoubtJournal : IDisposable
{
    // "BFMDOUB1", then records of 24 bytes: i64 first block, i64 count, u64 XxHash64 of those 16.
    private static ReadOnlySpan<byte> Magic => "BFMDOUB1"u8;
    private const int RecordLength = 24;
    private const string Suffix = ".influx";

    /// <summary>Blocks journaled at once while a trip writes (8 MiB at 64 KiB blocks).</summary>
    public const long RegionBlocks = 128;

    private readonly Lock _gate = new();
    private readonly string _path;
    private readonly int _blockSize;
    private readonly DiskDoubt _prior;
    private readonly HashSet<long> _regions = [];
    private readonly List<BlockRange> _touched = [];
    private FileStream? _append;
    private bool _whole;

    private DiskDoubtJournal(string path, int blockSize, DiskDoubt prior, FileStream? append)
    {
        _path = path;
        _blockSize = blockSize;
        _prior = prior;
        _append = append;
        _whole = prior.Whole;
    }

    /// <summary>The journal file of the map at <paramref name="mapPath"/>.</summary>
    public static string PathOf(string mapPath) => mapPath + Suffix;

    /// <summary>True when the map at <paramref name="mapPath"/> has a journal (some trip since it was saved did not commit).</summary>
    public static bool Exists(string mapPath) => File.Exists(PathOf(mapPath));

    /// <summary>What the journal of <paramref name="mapPath"/> puts in doubt now (<see cref="DiskDoubt.None"/> without one).</summary>
    /// <exception cref="IOException">the journal exists but cannot be read.</exception>
    public static DiskDoubt Read(string mapPath)
    {
        byte[] content;
        try
        {
            content = File.ReadAllBytes(PathOf(mapPath));
        }
        catch (Exception e) when (e is FileNotFoundException or DirectoryNotFoundException)
        {
            return DiskDoubt.None;
        }
        if (content.Length < Magic.Length || !content.AsSpan(0, Magic.Length).SequenceEqual(Magic) || (content.Length - Magic.Length) % RecordLength != 0)
            return DiskDoubt.All;
        var ranges = new List<BlockRange>();
        for (int at = Magic.Length; at < content.Length; at += RecordLength)
        {
            var record = content.AsSpan(at, RecordLength);
            long first = BinaryPrimitives.ReadInt64LittleEndian(record);
            long count = BinaryPrimitives.ReadInt64LittleEndian(record[8..]);
            if (BinaryPrimitives.ReadUInt64LittleEndian(record[16..]) != XxHash64.HashToUInt64(record[..16]) || first < 0 || count <= 0)
                return DiskDoubt.All;
            ranges.Add(new BlockRange(first, count));
        }
        return DiskDoubt.Of(ranges);
    }

    /// <summary>
    /// Marks the whole map of <paramref name="mapPath"/> in doubt, durably (its image was written
    /// by something that no journal follows).
    /// </summary>
    public static void DoubtAll(string mapPath)
    {
        Directory.CreateDirectory(Path.GetDirectoryName(Path.GetFullPath(mapPath))!);
        DurableFile.WriteAtomically(PathOf(mapPath), "in flux\n"u8);
    }

    /// <summary>
    /// Starts journaling a trip's writes for the map at <paramref name="mapPath"/>, keeping what
    /// earlier trips left in doubt (<paramref name="prior"/>, as read before). Durable on return:
    /// from then on the saved map is only trusted minus the journal.
    /// </summary>
    /// <remarks>
    /// When the store cannot take the journal (its file system is full or read-only) the map is
    /// removed instead (<see cref="Lost"/> says why) and the trip goes on keeping none: a full
    /// store costs a stock-sized trip, never a failed one.
    /// </remarks>
    /// <exception cref="IOException">the journal could not be written and the map not removed either.</exception>
    public static DiskDoubtJournal Begin(string mapPath, int blockSize, DiskDoubt prior)
    {
        string path = PathOf(mapPath);
        try
        {
            Directory.CreateDirectory(Path.GetDirectoryName(Path.GetFullPath(mapPath))!);
            if (prior.Whole)
            {
                DoubtAll(mapPath);
                return new DiskDoubtJournal(path, blockSize, prior, null);
            }
            DurableFile.WriteAtomically(path, Encode(prior.Ranges));
            // Unbuffered: every record is flushed at once anyway, and a buffer that failed to
            // flush would fail again in Dispose.
            var append = new FileStream(path, FileMode.Append, FileAccess.Write, FileShare.Read, bufferSize: 0);
            return new DiskDoubtJournal(path, blockSize, prior, append);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            return new DiskDoubtJournal(path, blockSize, DiskDoubt.All, null) { Lost = RemoveMap(mapPath, e) };
        }
    }

    /// <summary>
    /// Why this trip has no journal and the map was removed (the store could not be written when
    /// the trip began), or null. Once set, this host keeps no map of this trip.
    /// </summary>
    public string? Lost { get; private set; }

    /// <summary>
    /// The rule for a journal that cannot be written: without it the saved map could later be
    /// trusted against an image this trip changed, so the map goes; a deletion needs no free
    /// space. Returns the reason for logs and stats; throws only when even that fails.
    /// </summary>
    public static string RemoveMap(string mapPath, Exception cause)
    {
        try
        {
            // The map first: a crash between the two leaves a journal without a map (nothing trusted).
            File.Delete(mapPath);
            File.Delete(PathOf(mapPath));
            // Durable before the caller lets a write out: a map that came back after a power loss
            // would be trusted against an image this trip changed.
            DurableFile.FsyncDirectory(Path.GetDirectoryName(Path.GetFullPath(mapPath))!);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new IOException($"cannot journal the disk map {mapPath} ({cause.Message}), nor remove it ({e.Message})", cause);
        }
        return $"the store cannot be written ({cause.Message}): the disk map {mapPath} was removed";
    }

    /// <summary>
    /// A write of <paramref name="length"/> bytes at <paramref name="offset"/> is about to go out:
    /// returns once its blocks are journaled durably.
    /// </summary>
    public void Touching(ulong offset, ulong length)
    {
        if (length == 0) return;
        if (offset / (ulong)_blockSize >= (ulong)DiskBlockMap.MaxBlockCount || length > ulong.MaxValue - offset
            || (offset + length - 1) / (ulong)_blockSize >= (ulong)DiskBlockMap.MaxBlockCount)
        {
            // No map describes that far: whatever it is, it cannot be followed block by block.
            DoubtEverything();
            return;
        }
        long first = (long)(offset / (ulong)_blockSize);
        long last = (long)((offset + length - 1) / (ulong)_blockSize);
        lock (_gate)
        {
            if (_touched.Count > 0 && _touched[^1].End >= first && _touched[^1].First <= first)
                _touched[^1] = new BlockRange(_touched[^1].First, Math.Max(_touched[^1].End, last + 1) - _touched[^1].First);
            else
                _touched.Add(new BlockRange(first, last + 1 - first));
            if (_touched.Count > 4 * DiskDoubt.MaxRanges)
            {
                // Scattered writes: keep them merged, and beyond what a hello can carry doubt everything.
                var merged = DiskDoubt.Of(_touched);
                _touched.Clear();
                _touched.AddRange(merged.Ranges);
                if (merged.Whole)
                    DoubtEverythingLocked();
            }
            if (_whole || _append is null) return;
            List<BlockRange>? fresh = null;
            for (long region = first / RegionBlocks; region <= last / RegionBlocks; region++)
            {
                if (_regions.Add(region))
                    (fresh ??= []).Add(new BlockRange(region * RegionBlocks, RegionBlocks));
            }
            if (fresh is null) return;
            var bytes = Encode(fresh)[Magic.Length..];
            // A failure here (the store filled up during the trip) fails the trip before the write
            // goes out. Removing the map instead, as Begin does, could race bfmigd, which seals
            // a failed arrival's map as soon as its QEMU stopped; at Begin nothing is written yet.
            _append.Write(bytes);
            _append.Flush(flushToDisk: true);
        }
    }

    /// <summary>From now on every block is in doubt (the writes can no longer be followed), durably.</summary>
    public void DoubtEverything()
    {
        lock (_gate)
            DoubtEverythingLocked();
    }

    private void DoubtEverythingLocked()
    {
        if (_whole) return;
        _append?.Dispose();
        _append = null;
        // On failure the coarse journal stays: durable, and a superset of what was written.
        DoubtAll(_path[..^Suffix.Length]);
        _whole = true;
    }

    /// <summary>What this journal puts in doubt so far: the earlier trips' doubt and this trip's exact writes.</summary>
    public DiskDoubt Doubt
    {
        get
        {
            lock (_gate)
                return _whole ? DiskDoubt.All : _prior.Union(DiskDoubt.Of(_touched));
        }
    }

    /// <summary>
    /// The trip ends without a commit: replaces the coarse journal with <see cref="Doubt"/>, exactly
    /// (crash-consistently: a crash leaves the coarse one, a superset).
    /// </summary>
    public void Settle()
    {
        lock (_gate)
        {
            _append?.Dispose();
            _append = null;
            if (_whole) return;
            var doubt = _prior.Union(DiskDoubt.Of(_touched));
            if (doubt.Whole)
            {
                DoubtEverythingLocked();
                return;
            }
            DurableFile.WriteAtomically(_path, Encode(doubt.Ranges));
        }
    }

    /// <summary>The trip committed a new map: nothing is in doubt any more.</summary>
    public void Clear()
    {
        lock (_gate)
        {
            _append?.Dispose();
            _append = null;
            File.Delete(_path);
            DurableFile.FsyncDirectory(Path.GetDirectoryName(Path.GetFullPath(_path))!);
        }
    }

    private static byte[] Encode(IReadOnlyList<BlockRange> ranges)
    {
        var b = new byte[Magic.Length + RecordLength * ranges.Count];
        Magic.CopyTo(b);
        for (int i = 0; i < ranges.Count; i++)
        {
            var record = b.AsSpan(Magic.Length + RecordLength * i, RecordLength);
            BinaryPrimitives.WriteInt64LittleEndian(record, ranges[i].First);
            BinaryPrimitives.WriteInt64LittleEndian(record[8..], ranges[i].Count);
            BinaryPrimitives.WriteUInt64LittleEndian(record[16..], XxHash64.HashToUInt64(record[..16]));
        }
        return b;
    }

    /// <inheritdoc/>
    public void Dispose()
    {
        lock (_gate)
        {
            _append?.Dispose();
            _append = null;
        }
    }
}
