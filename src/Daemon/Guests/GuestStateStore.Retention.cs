using BFMig.Native.Linux;

namespace BFMig.Daemon.Guests;

/// <summary>
/// What one guest's state directory occupies on disk (allocated bytes, so sparse page files count
/// only the pages they hold), by part.
/// </summary>
/// <param name="MemoryStore"><c>mem/</c>: page files, page-hash index, block list, state.</param>
/// <param name="DiskMaps"><c>disk/</c>: the block-hash maps of the disks left behind.</param>
/// <param name="Checkpoints"><c>checkpoints/</c>: checkpoint XMLs kept for the next arrival.</param>
/// <param name="Other">Everything else (location record, name, last trip): kilobytes.</param>
public sealed record StoreCost(long MemoryStore, long DiskMaps, long Checkpoints, long Other)
{
    /// <summary>Everything the guest's directory occupies.</summary>
    public long Total => MemoryStore + DiskMaps + Checkpoints + Other;

    /// <summary>
    /// What eviction frees: the departure snapshot (memory store and disk maps). The rest stays:
    /// the location record is the split-brain rule's evidence, and it and the checkpoints are small.
    /// </summary>
    public long Evictable => MemoryStore + DiskMaps;
}

public sealed partial class GuestStateStore
{
    /// <summary>The parts of a guest's directory that eviction removes (see <see cref="StoreCost.Evictable"/>).</summary>
    private static readonly string[] SnapshotParts = ["mem", "disk"];

    /// <summary>What the guest's state occupies on disk now (all zero when nothing is retained).</summary>
    public StoreCost Cost(Guid uuid)
    {
        var dir = GuestDirectory(uuid);
        var memory = FileSpace.AllocatedBytesUnder(Path.Combine(dir, "mem"));
        var disk = FileSpace.AllocatedBytesUnder(Path.Combine(dir, "disk"));
        var checkpoints = FileSpace.AllocatedBytesUnder(Path.Combine(dir, "checkpoints"));
        return new StoreCost(memory, disk, checkpoints, Math.Max(0, FileSpace.AllocatedBytesUnder(dir) - memory - disk - checkpoints));
    }

    /// <summary>
    /// When anything of the guest's state last changed (the newest modification time under its
    /// directory): its last trip, or the last time a stream or the daemon wrote its record. Null
    /// when nothing is retained.
    /// </summary>
    public DateTimeOffset? LastChanged(Guid uuid)
    {
        var dir = GuestDirectory(uuid);
        if (!Directory.Exists(dir))
            return null;
        DateTime newest = default;
        try
        {
            var options = new EnumerationOptions { RecurseSubdirectories = true, AttributesToSkip = FileAttributes.ReparsePoint, IgnoreInaccessible = true };
            foreach (var entry in new DirectoryInfo(dir).EnumerateFileSystemInfos("*", options))
            {
                if (entry.LastWriteTimeUtc > newest)
                    newest = entry.LastWriteTimeUtc;
            }
        }
        catch (DirectoryNotFoundException)
        {
            return null;
        }
        return newest == default ? new DateTimeOffset(Directory.GetLastWriteTimeUtc(dir)) : new DateTimeOffset(newest);
    }

    /// <summary>
    /// Removes the guest's departure snapshot (memory store and disk maps) and keeps its location
    /// record, name and checkpoints: the next trip sends everything, as after <c>bfmig forget</c>,
    /// but a guest that is away stays guarded against a second copy. Takes the store's lock first,
    /// like <see cref="Delete"/>, so a helper using it makes this fail (<see cref="IOException"/>).
    /// Returns the bytes freed.
    /// </summary>
    public long Evict(Guid uuid)
    {
        var dir = GuestDirectory(uuid);
        var before = Cost(uuid).Evictable;
        var mem = Path.Combine(dir, "mem");
        var doomed = Path.Combine(_root, $".evict-{uuid:D}-{Environment.TickCount64}");
        Directory.CreateDirectory(doomed, UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.UserExecute);
        try
        {
            // Under the store's lock both parts leave together: a helper starting after this finds
            // neither and starts from nothing (its hello's digest then disagrees, so nothing is elided).
            using (Directory.Exists(mem) ? Lock(mem) : null)
            {
                foreach (var part in SnapshotParts)
                {
                    var path = Path.Combine(dir, part);
                    if (Directory.Exists(path))
                        Directory.Move(path, Path.Combine(doomed, part));
                }
            }
        }
        finally
        {
            Directory.Delete(doomed, recursive: true);
        }
        return before;
    }
}
