namespace BFMig.Daemon.Transparent;

/// <summary>
/// The guests whose memory stream transparent mode is carrying straight to the peer's QEMU right
/// now, where to, and why: their multifd channels must go the same way (and a silent connection to
/// where one goes is its post-copy preempt channel, which goes straight to the peer's QEMU anyway). A channel handed to a helper while
/// its main stream went around BFMig would wait at the peer's receiver for a main stream that
/// never comes there. An entry lives exactly as long as the carried main connection: a
/// migration's channels connect while its main stream is open, and a failed attempt's entry is
/// gone before a retry's channels come. (The reverse, a channel carried while its main stream
/// went through a helper, is what the shared probe answer prevents; a full set of transfer slots
/// still fails such a migration, as before, and QEMU keeps the guest.)
/// </summary>
public sealed class CarriedMainStreams
{
    private readonly Lock _gate = new();
    private readonly Dictionary<Guid, Entry> _carrying = [];

    private sealed class Entry(System.Net.IPEndPoint to, string why)
    {
        public System.Net.IPEndPoint To { get; } = to;

        public string Why { get; } = why;
    }

    /// <summary>The guest's memory stream to <paramref name="to"/> is carried for <paramref name="why"/> until the returned handle is disposed.</summary>
    public IDisposable Carrying(Guid guest, System.Net.IPEndPoint to, string why)
    {
        var entry = new Entry(to, why);
        lock (_gate)
            _carrying[guest] = entry;
        return new DisposeAction(() => End(guest, entry));
    }

    /// <summary>Why a multifd channel of <paramref name="guest"/> must be carried too, or null.</summary>
    public string? ChannelMustFollow(Guid guest)
    {
        lock (_gate)
            return _carrying.TryGetValue(guest, out var main) ? $"its main stream is carried ({main.Why})" : null;
    }

    /// <summary>The guest whose carried memory stream goes to <paramref name="to"/> now, or null.</summary>
    public Guid? GuestGoingTo(System.Net.IPEndPoint to)
    {
        lock (_gate)
        {
            foreach (var (guest, main) in _carrying)
            {
                if (main.To.Equals(to))
                    return guest;
            }
            return null;
        }
    }

    private void End(Guid guest, Entry entry)
    {
        lock (_gate)
        {
            // A later main stream of the same guest may have replaced it: that one stays.
            if (_carrying.TryGetValue(guest, out var current) && ReferenceEquals(current, entry))
                _carrying.Remove(guest);
        }
    }
}
