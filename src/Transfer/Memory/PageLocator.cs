namespace BFMig.Transfer.Memory;

/// <summary>
/// Finds a retained page by its content hash (the sender's REF candidates). A fixed array of
/// 4-slot buckets indexed by the hash's low bits, each slot packing a 24-bit tag from the hash's
/// high bits, the block (8 bits) and the page (32 bits). It may forget entries (a full bucket
/// drops its oldest) and may hold stale ones (the page was rewritten since): callers verify every
/// candidate against the page-hash index, so a miss only costs a REF, never correctness. Unlike a
/// dictionary it never grows, allocates nothing per page and touches one cache line per operation.
/// </summary>
internal sealed class PageLocator
{
    private const int Ways = 4;
    private const int MaxSlotsLog2 = 25;   // 256 MiB: beyond ~16M pages the table is lossy by design
    private readonly ulong[] _slots;
    private readonly int _bucketMask;

    /// <summary>Sized for <paramref name="pages"/> pages (twice as many slots, at least 1024).</summary>
    public PageLocator(long pages)
    {
        int log2 = 10;
        while (log2 < MaxSlotsLog2 && (1L << log2) < 2 * pages) log2++;
        _slots = new ulong[1 << log2];
        _bucketMask = ((1 << log2) / Ways) - 1;
    }

    /// <summary>True when every block number and page number fits a slot.</summary>
    public static bool Fits(int blocks, long maxPages) => blocks <= byte.MaxValue + 1 && maxPages <= uint.MaxValue + 1L;

    /// <summary>Number of slots (for tests).</summary>
    internal int Capacity => _slots.Length;

    // The tag's lowest bit is forced to 1 so that no entry is 0 (empty).
    private static ulong Tag(UInt128 hash) => ((ulong)(hash >> 104) | 1) << 40;

    private int Bucket(UInt128 hash) => ((int)(ulong)hash & _bucketMask) * Ways;

    /// <summary>Records that <paramref name="block"/>/<paramref name="page"/> now holds content with <paramref name="hash"/>.</summary>
    public void Insert(UInt128 hash, int block, long page)
    {
        ulong entry = Tag(hash) | ((ulong)(uint)block << 32) | (uint)page;
        var bucket = _slots.AsSpan(Bucket(hash), Ways);
        int i = 0;
        for (; i < Ways; i++)
        {
            if (bucket[i] == entry) return;
            if (bucket[i] == 0)
            {
                bucket[i] = entry;
                return;
            }
        }
        // Full: the newest goes first, the oldest (most likely stale) falls out.
        bucket[..(Ways - 1)].CopyTo(bucket[1..]);
        bucket[0] = entry;
    }

    /// <summary>
    /// Calls <paramref name="verify"/> for each candidate location of <paramref name="hash"/>, newest
    /// first, until it returns true; returns whether one did.
    /// </summary>
    public bool TryFind<TVerify>(UInt128 hash, ref TVerify verify, out int block, out long page) where TVerify : struct, ICandidateCheck
    {
        ulong tag = Tag(hash);
        var bucket = _slots.AsSpan(Bucket(hash), Ways);
        foreach (ulong e in bucket)
        {
            if (e == 0) break;
            if ((e & (0xFFFFFFUL << 40)) != tag) continue;
            block = (int)((e >> 32) & 0xFF);
            page = (uint)e;
            if (verify.Holds(block, page)) return true;
        }
        block = -1;
        page = -1;
        return false;
    }

    /// <summary>Checks that a candidate location still holds the wanted content.</summary>
    internal interface ICandidateCheck
    {
        bool Holds(int block, long page);
    }
}
