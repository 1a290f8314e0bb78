using System.Buffers.Binary;

namespace BFMig.Transfer.Memory;

/// <summary>Pages [<see cref="First"/>, <see cref="First"/> + <see cref="Count"/>) of RAM block <see cref="Block"/> (index in the store's block list).</summary>
public readonly record struct PageRange(int Block, long First, long Count)
{
    /// <summary>One past the last page.</summary>
    public long End => First + Count;
}

/// <summary>
/// The pages of a committed memory store that may no longer hold what its index says: those a
/// trip since the commit may have written (the index on disk is only rewritten by a commit).
/// <see cref="Whole"/>: every page (the store is then rebuilt and matches no peer). A store minus
/// its doubt is still true page for page, so a failed trip costs the next one only what it left
/// in doubt. The memory counterpart of <c>DiskDoubt</c>.
/// </summary>
public sealed class MemoryDoubt
{
    /// <summary>Most ranges a doubt keeps (and a hello reply carries); beyond that nearby ranges are merged (a superset: still safe).</summary>
    public const int MaxRanges = 4096;

    /// <summary>Bytes of one range on the wire: <c>be32 block, be64 first, be64 count</c>.</summary>
    private const int WireRange = 20;

    private MemoryDoubt(bool whole, IReadOnlyList<PageRange> ranges)
    {
        Whole = whole;
        Ranges = ranges;
    }

    /// <summary>No page in doubt.</summary>
    public static MemoryDoubt None { get; } = new(false, []);

    /// <summary>Every page in doubt.</summary>
    public static MemoryDoubt All { get; } = new(true, []);

    /// <summary>Every page is in doubt.</summary>
    public bool Whole { get; }

    /// <summary>Ranges in doubt, sorted by block then page, disjoint and not adjacent (empty when <see cref="Whole"/>).</summary>
    public IReadOnlyList<PageRange> Ranges { get; }

    /// <summary>True when no page is in doubt.</summary>
    public bool IsEmpty => !Whole && Ranges.Count == 0;

    /// <summary>Pages in doubt (<see cref="long.MaxValue"/> when whole).</summary>
    public long PageCount => Whole ? long.MaxValue : Ranges.Sum(r => r.Count);

    /// <summary>
    /// The doubt of <paramref name="ranges"/> (any order, overlaps allowed, empty ranges dropped).
    /// More than <see cref="MaxRanges"/> ranges are merged across their smallest gaps until they fit.
    /// </summary>
    public static MemoryDoubt Of(IEnumerable<PageRange> ranges)
    {
        var merged = Merge(ranges.Where(r => r.Count > 0 && r.First >= 0 && r.Block >= 0), 0);
        for (long gap = 1; merged.Count > MaxRanges; gap *= 2)
            merged = Merge(merged, gap);
        return merged.Count == 0 ? None : new MemoryDoubt(false, merged);
    }

    // Sorted ranges with those of a block closer than gap pages joined (0: overlapping or adjacent).
    private static List<PageRange> Merge(IEnumerable<PageRange> ranges, long gap)
    {
        var merged = new List<PageRange>();
        foreach (var r in ranges.OrderBy(r => r.Block).ThenBy(r => r.First))
        {
            if (merged.Count > 0 && merged[^1].Block == r.Block && r.First <= merged[^1].End + gap)
                merged[^1] = merged[^1] with { Count = Math.Max(merged[^1].End, r.End) - merged[^1].First };
            else
                merged.Add(r);
        }
        return merged;
    }

    /// <summary>Pages in doubt in either.</summary>
    public MemoryDoubt Union(MemoryDoubt other) => Whole || other.Whole ? All : Of(Ranges.Concat(other.Ranges));

    /// <summary>Short text for logs and stats.</summary>
    public string Describe() => Whole ? "every page" : $"{PageCount} pages in {Ranges.Count} ranges";

    /// <summary>Bytes <see cref="Encode"/> writes.</summary>
    public int EncodedLength => 5 + WireRange * Ranges.Count;

    /// <summary>Wire form: <c>u8 whole, be32 count, count x (be32 block, be64 first, be64 count)</c>.</summary>
    public byte[] Encode()
    {
        var b = new byte[EncodedLength];
        b[0] = Whole ? (byte)1 : (byte)0;
        BinaryPrimitives.WriteInt32BigEndian(b.AsSpan(1), Ranges.Count);
        for (int i = 0; i < Ranges.Count; i++)
        {
            var s = b.AsSpan(5 + WireRange * i);
            BinaryPrimitives.WriteInt32BigEndian(s, Ranges[i].Block);
            BinaryPrimitives.WriteInt64BigEndian(s[4..], Ranges[i].First);
            BinaryPrimitives.WriteInt64BigEndian(s[12..], Ranges[i].Count);
        }
        return b;
    }

    /// <summary>
    /// Decodes <see cref="Encode"/>'s form from the start of <paramref name="p"/>: the doubt and
    /// the bytes it took, or null when malformed or not canonical (ranges sorted, disjoint, not
    /// adjacent: what <see cref="Encode"/> writes, so a decoded doubt encodes to the same bytes).
    /// </summary>
    public static (MemoryDoubt Doubt, int Length)? Decode(ReadOnlySpan<byte> p)
    {
        if (p.Length < 5 || p[0] > 1) return null;
        int count = BinaryPrimitives.ReadInt32BigEndian(p[1..]);
        if (count < 0 || count > MaxRanges || p.Length < 5 + (long)WireRange * count) return null;
        int length = 5 + WireRange * count;
        if (p[0] == 1) return count == 0 ? (All, length) : null;
        var ranges = new PageRange[count];
        for (int i = 0; i < count; i++)
        {
            var s = p[(5 + WireRange * i)..];
            int block = BinaryPrimitives.ReadInt32BigEndian(s);
            long first = BinaryPrimitives.ReadInt64BigEndian(s[4..]);
            long n = BinaryPrimitives.ReadInt64BigEndian(s[12..]);
            if (block < 0 || first < 0 || n <= 0 || first > MaxPages || n > MaxPages) return null;
            ranges[i] = new PageRange(block, first, n);
            if (i > 0 && (block < ranges[i - 1].Block || block == ranges[i - 1].Block && first <= ranges[i - 1].End)) return null;
        }
        return (count == 0 ? None : new MemoryDoubt(false, ranges), length);
    }

    /// <summary>Pages of the largest block a doubt can name (2^52: far beyond any RAM block).</summary>
    public const long MaxPages = 1L << 52;

    /// <summary>Same pages in doubt.</summary>
    public bool SameAs(MemoryDoubt other) => Whole == other.Whole && Ranges.SequenceEqual(other.Ranges);
}
