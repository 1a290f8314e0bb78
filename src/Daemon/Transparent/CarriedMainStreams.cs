namespace BFMig.Daemon.Transparent;

/// <summary>
/// The guests whose latest memory stream transparent mode carried straight to the peer's QEMU,
/// and why: their multifd channels must go the same way. A channel handed to a helper while its
/// main stream went around BFMig would wait at the peer's receiver for a main stream that never
/// comes there; the reverse (a channel carried, its main stream through a helper) is what the
/// shared probe answer prevents, and a full set of transfer slots fails such a migration, as
/// it did before (QEMU keeps the guest).
/// </summary>
public sealed class CarriedMainStreams(TimeProvider time)
{
    /// <summary>QEMU opens a migration's channels right after its main stream: a decision older than this is another migration's.</summary>
    public static readonly TimeSpan ChannelWindow = TimeSpan.FromSeconds(60);

    private readonly Lock _gate = new();
    private readonly Dictionary<Guid, (long At, string Why)> _carried = [];

    /// <summary>The guest's memory stream was carried (<paramref name="why"/>) or, when null, went through a helper.</summary>
    public void MainStream(Guid guest, string? why)
    {
        lock (_gate)
        {
            long now = time.GetTimestamp();
            // Small: one entry per guest whose main stream was carried in the last minute.
            foreach (var (uuid, old) in _carried.Where(e => time.GetElapsedTime(e.Value.At, now) > ChannelWindow).ToList())
                _carried.Remove(uuid);
            if (why is null)
                _carried.Remove(guest);
            else
                _carried[guest] = (now, why);
        }
    }

    /// <summary>Why a multifd channel of <paramref name="guest"/> must be carried too, or null.</summary>
    public string? ChannelMustFollow(Guid guest)
    {
        lock (_gate)
        {
            return _carried.TryGetValue(guest, out var main) && time.GetElapsedTime(main.At) <= ChannelWindow
                ? $"its main stream was carried ({main.Why})"
                : null;
        }
    }
}
