namespace BFMig.Fuzz;

/// <summary>
/// The allocation bound of one input: hostile input may cost memory in proportion to what it is
/// allowed to declare, never more. Counted process-wide (the NBD filter allocates on pool threads).
/// </summary>
internal readonly struct Budget(long limit, string what)
{
    private readonly long _start = GC.GetTotalAllocatedBytes();

    public static Budget Start(long limit, string what) => new(limit, what);

    /// <summary>Throws when more than the limit (plus <paramref name="declared"/>, what the input may legitimately claim) was allocated.</summary>
    public void Check(long declared = 0)
    {
        long used = GC.GetTotalAllocatedBytes() - _start;
        if (used > limit + declared)
            throw new InvalidOperationException($"{what} allocated {used:N0} bytes for one input (bound {limit + declared:N0})");
    }
}
