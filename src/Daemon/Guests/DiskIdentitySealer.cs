namespace BFMig.Daemon.Guests;

/// <summary>
/// Decides when the identity of the images a departing guest left behind may be captured.
/// A receiving helper trusts a disk map only if the identity it names (inode, size, mtime) is
/// the image's now; the sending helper cannot capture it, because its QEMU still holds the image
/// and rewrites the header when it lets go (qcow2 bitmaps, dirty flags). So the helper names the
/// image (a pending identity) and the capture waits for both: the trip ended with its maps
/// confirmed, and libvirt reported that the source QEMU stopped for the migration; in either
/// order, only if the guest did not run here again in between, and within
/// <see cref="MaxGap"/> of each other.
/// </summary>
/// <param name="capture">Captures the identities of these map files (called once per departure, any thread).</param>
/// <param name="time">Clock for <see cref="MaxGap"/>.</param>
public sealed class DiskIdentitySealer(Action<Guid, string, IReadOnlyList<string>> capture, TimeProvider time)
{
    /// <summary>Longest time between the trip's end and the source's stop that still belong together.</summary>
    public static readonly TimeSpan MaxGap = TimeSpan.FromMinutes(10);

    private readonly Lock _gate = new();
    private readonly Dictionary<Guid, Pending> _pending = [];

    private sealed record Pending(IReadOnlyList<string> Maps, bool SourceStopped, DateTimeOffset At);

    /// <summary>An outgoing trip ended and both hosts confirmed these maps.</summary>
    public void TripConfirmed(Guid uuid, string name, IReadOnlyList<string> maps)
    {
        if (maps.Count == 0)
            return;
        bool now;
        lock (_gate)
        {
            now = _pending.TryGetValue(uuid, out var p) && p.SourceStopped && Fresh(p);
            if (now)
                _pending.Remove(uuid);
            else
                _pending[uuid] = new Pending(maps, false, time.GetUtcNow());
        }
        if (now)
            capture(uuid, name, maps);
    }

    /// <summary>libvirt reported the guest stopped here because it migrated away.</summary>
    public void SourceStopped(Guid uuid, string name)
    {
        IReadOnlyList<string>? maps = null;
        lock (_gate)
        {
            if (_pending.TryGetValue(uuid, out var p) && !p.SourceStopped && Fresh(p))
            {
                maps = p.Maps;
                _pending.Remove(uuid);
            }
            else
            {
                _pending[uuid] = new Pending([], true, time.GetUtcNow());
            }
        }
        if (maps is not null)
            capture(uuid, name, maps);
    }

    /// <summary>The guest runs here (again): the images are in use, whatever was pending is void.</summary>
    public void GuestRunning(Guid uuid)
    {
        lock (_gate)
            _pending.Remove(uuid);
    }

    private bool Fresh(Pending p) => time.GetUtcNow() - p.At <= MaxGap;
}
