namespace BFMig.Transfer.Disk.Nbd;

/// <summary>What a request does to a range of target blocks once the server confirms it.</summary>
internal enum BlockCommitKind : byte
{
    /// <summary>Content unknown afterwards (partial write, TRIM, failure).</summary>
    Unknown,

    /// <summary>One block now holds data with <see cref="BlockCommit.Hash"/>.</summary>
    Data,

    /// <summary>Every block in the range reads as zero.</summary>
    Zero,
}

/// <summary>
/// The effect of one request on blocks [First, First + Count). Zero and unknown ranges stay one
/// entry however long (a WRITE_ZEROES of terabytes costs one entry), data is one entry per block.
/// </summary>
internal readonly record struct BlockCommit(long First, long Count, BlockCommitKind Kind, UInt128 Hash)
{
    /// <summary>Appends the effect on <paramref name="block"/>, merging with the previous entry where possible.</summary>
    public static void Add(List<BlockCommit> commits, long block, BlockCommitKind kind, UInt128 hash = default)
    {
        if (kind != BlockCommitKind.Data && commits.Count > 0)
        {
            var last = commits[^1];
            if (last.Kind == kind && last.First + last.Count == block)
            {
                commits[^1] = last with { Count = last.Count + 1 };
                return;
            }
        }
        commits.Add(new BlockCommit(block, 1, kind, hash));
    }
}
