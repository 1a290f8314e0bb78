namespace BFMig.Transfer.Store;

/// <summary>
/// The store is a cache: a trip must never fail because it is full. Before a receiver promises a
/// store, it checks that the store's file system can take what this trip may write; if not, the
/// stream is carried plain (nothing retained for it) and the stats and the journal say why. A
/// return trip whose store matches rewrites pages in place, so it needs only a margin; any other
/// trip may write every page of the guest.
/// </summary>
public static class StoreSpace
{
    /// <summary>Free space kept for the store's own metadata and the trip's new pages when the store matches.</summary>
    public const long Margin = 64L * 1024 * 1024;

    /// <summary>Null when <paramref name="root"/>'s file system has room for <paramref name="needed"/> bytes; otherwise why not.</summary>
    public static string? Shortfall(string root, long needed)
    {
        long free;
        try
        {
            Directory.CreateDirectory(root);
            free = new DriveInfo(Path.GetFullPath(root)).AvailableFreeSpace;
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException or ArgumentException)
        {
            return $"the store's file system at {root} cannot be checked: {e.Message}";
        }
        return free >= needed ? null
            : $"the store's file system at {root} has {free} bytes free, this trip may write {needed}: carried without a store (nothing retained for it)";
    }

    /// <summary>What a memory trip may write: a margin when the store matches the sender, else the guest's whole RAM plus the margin.</summary>
    public static long NeededForMemory(bool storeMatches, long maxRamBytes) =>
        storeMatches ? Margin : maxRamBytes + Margin;
}
