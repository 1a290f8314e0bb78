using BFMig.Daemon.Transfers;

namespace BFMig.Daemon.Guests;

/// <summary>A guest left this host by migration.</summary>
/// <param name="Uuid">The guest.</param>
/// <param name="Name">Its name.</param>
/// <param name="Trip">The outgoing trip's stream outcomes; null when no stream went through BFMig (bypassed).</param>
/// <param name="PostCopy">
/// The migration switched to post-copy before the trip ended: the guest ran at the destination
/// from then on, so a memory stream that failed afterwards did not stop the departure.
/// </param>
public sealed record Departure(Guid Uuid, string Name, IReadOnlyList<TransferOutcome>? Trip, bool PostCopy = false);

/// <summary>
/// Joins the two halves of a departure: libvirt reports that the source QEMU stopped for the
/// migration (<see cref="SourceStopped"/>), and the outgoing trip's helpers ended
/// (<see cref="TripEnded"/>), in either order. Only then is it known what BFMig carried, so only
/// then may anything be done to the images the guest left (<see cref="ImageCustody"/>): a sending
/// helper cannot capture an image's identity itself, because its QEMU still holds the image and
/// rewrites the header when it lets go. A stop with no BFMig stream since the guest last ran here
/// is a migration that bypassed BFMig (reported at once, with no trip). A <c>Started</c>/<c>Resumed</c>
/// in between (the migration failed, the guest runs here again) voids what was pending, and two
/// halves more than <see cref="MaxGap"/> apart do not belong together.
/// </summary>
/// <param name="departed">Called once per departure (any thread).</param>
/// <param name="time">Clock for <see cref="MaxGap"/>.</param>
public sealed class DepartureJoin(Action<Departure> departed, TimeProvider time)
{
    /// <summary>Longest time between the trip's end and the source's stop that still belong together.</summary>
    public static readonly TimeSpan MaxGap = TimeSpan.FromMinutes(10);

    private readonly Lock _gate = new();
    private readonly Dictionary<Guid, Pending> _pending = [];

    // Streaming: an outgoing stream connected and its trip has not ended yet.
    private sealed record Pending(bool Streaming, IReadOnlyList<TransferOutcome>? Outcomes, bool SourceStopped, DateTimeOffset At, bool PostCopy = false);

    /// <summary>An outgoing BFMig stream of the guest connected (its trip is under way).</summary>
    public void StreamStarted(Guid uuid)
    {
        lock (_gate)
        {
            if (!_pending.TryGetValue(uuid, out var p) || p.Outcomes is not null || !Fresh(p))
                _pending[uuid] = new Pending(true, null, false, time.GetUtcNow());
        }
    }

    /// <summary>libvirt reported that the outgoing migration switched to post-copy (the source paused for good).</summary>
    public void PostCopyStarted(Guid uuid)
    {
        lock (_gate)
        {
            if (_pending.TryGetValue(uuid, out var p) && Fresh(p))
                _pending[uuid] = p with { PostCopy = true };
        }
    }

    /// <summary>The last stream of an outgoing trip ended, with these outcomes.</summary>
    public void TripEnded(Guid uuid, string name, IReadOnlyList<TransferOutcome> outcomes)
    {
        bool now;
        bool postCopy;
        lock (_gate)
        {
            var known = _pending.TryGetValue(uuid, out var p) && Fresh(p);
            postCopy = known && p!.PostCopy;
            now = known && p!.SourceStopped;
            if (now)
                _pending.Remove(uuid);
            else
                _pending[uuid] = new Pending(false, outcomes, false, time.GetUtcNow(), postCopy);
        }
        if (now)
            departed(new Departure(uuid, name, outcomes, postCopy));
    }

    /// <summary>libvirt reported the guest stopped here because it migrated away.</summary>
    public void SourceStopped(Guid uuid, string name)
    {
        Departure? now = null;
        lock (_gate)
        {
            _pending.TryGetValue(uuid, out var p);
            if (p is { Outcomes: not null, SourceStopped: false } && Fresh(p))
            {
                now = new Departure(uuid, name, p.Outcomes, p.PostCopy);
                _pending.Remove(uuid);
            }
            else if (p is { Streaming: true } && Fresh(p))
            {
                _pending[uuid] = p with { SourceStopped = true, At = time.GetUtcNow() };
            }
            else
            {
                // No BFMig stream since the guest last ran here: the migration went around BFMig.
                now = new Departure(uuid, name, null);
                _pending.Remove(uuid);
            }
        }
        if (now is not null)
            departed(now);
    }

    /// <summary>The guest runs here (again): the images are in use, whatever was pending is void.</summary>
    public void GuestRunning(Guid uuid)
    {
        lock (_gate)
            _pending.Remove(uuid);
    }

    private bool Fresh(Pending p) => time.GetUtcNow() - p.At <= MaxGap;
}
