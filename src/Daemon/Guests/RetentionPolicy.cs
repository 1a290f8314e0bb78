using System.Globalization;

namespace BFMig.Daemon.Guests;

/// <summary>
/// The limits on what a host retains (<c>[retention]</c> in bfmig.conf); 0 turns a limit off.
/// </summary>
/// <param name="MaxTotalBytes">All guests' state together (<c>retention:max_total_mib</c>).</param>
/// <param name="MaxGuestBytes">One guest's state (<c>retention:max_guest_mib</c>).</param>
/// <param name="MaxAge">Time since a guest's state last changed (<c>retention:max_age_days</c>).</param>
/// <param name="Interval">How often bfmigd checks, besides after every trip (<c>retention:interval_minutes</c>).</param>
public sealed record RetentionLimits(long MaxTotalBytes, long MaxGuestBytes, TimeSpan MaxAge, TimeSpan Interval)
{
    /// <summary>No limit at all (nothing is ever evicted).</summary>
    public static readonly RetentionLimits None = new(0, 0, TimeSpan.Zero, TimeSpan.FromHours(1));

    /// <summary>True when some limit is set.</summary>
    public bool Any => MaxTotalBytes > 0 || MaxGuestBytes > 0 || MaxAge > TimeSpan.Zero;

    /// <summary>One line for the log and for <c>bfmig list</c>.</summary>
    public override string ToString() => !Any ? "no limits" : string.Join(", ", new[]
    {
        MaxTotalBytes > 0 ? $"{Mib(MaxTotalBytes)} per host" : null,
        MaxGuestBytes > 0 ? $"{Mib(MaxGuestBytes)} per guest" : null,
        MaxAge > TimeSpan.Zero ? string.Create(CultureInfo.InvariantCulture, $"{MaxAge.TotalDays:0.##} days") : null,
    }.Where(p => p is not null));

    internal static string Mib(long bytes) => string.Create(CultureInfo.InvariantCulture, $"{bytes / 1048576.0:0.#} MiB");
}

/// <summary>One guest as the policy sees it.</summary>
/// <param name="Uuid">The guest.</param>
/// <param name="Cost">What its state occupies.</param>
/// <param name="LastChanged">When its state last changed.</param>
/// <param name="Protected">Why it must not be touched now (a trip running or pending), null when it may be evicted.</param>
public sealed record RetentionCandidate(Guid Uuid, StoreCost Cost, DateTimeOffset LastChanged, string? Protected);

/// <summary>A guest to evict and why.</summary>
public sealed record Eviction(Guid Uuid, long Bytes, string Reason);

/// <summary>
/// Decides which guests' departure snapshots to evict, oldest first: every guest older than the
/// age limit, every guest larger than the per-guest limit, then the oldest remaining ones until
/// the host's total fits. A protected guest is never chosen, but its bytes count toward the total
/// (they are on disk all the same). Pure: the caller evicts.
/// </summary>
public static class RetentionPolicy
{
    /// <summary>The evictions, in the order to run them (oldest first).</summary>
    public static IReadOnlyList<Eviction> Choose(IEnumerable<RetentionCandidate> candidates, RetentionLimits limits, DateTimeOffset now)
    {
        var all = candidates.OrderBy(c => c.LastChanged).ThenBy(c => c.Uuid).ToList();
        var total = all.Sum(c => c.Cost.Total);
        var chosen = new List<Eviction>();
        foreach (var c in all)
        {
            if (c.Protected is not null || c.Cost.Evictable == 0)
                continue;
            var age = now - c.LastChanged;
            string? reason = null;
            if (limits.MaxAge > TimeSpan.Zero && age > limits.MaxAge)
                reason = string.Create(CultureInfo.InvariantCulture, $"unchanged for {age.TotalDays:0.#} days, over the limit of {limits.MaxAge.TotalDays:0.##} days");
            else if (limits.MaxGuestBytes > 0 && c.Cost.Evictable > limits.MaxGuestBytes)
                reason = $"its snapshot occupies {RetentionLimits.Mib(c.Cost.Evictable)}, over the per-guest limit of {RetentionLimits.Mib(limits.MaxGuestBytes)}";
            else if (limits.MaxTotalBytes > 0 && total > limits.MaxTotalBytes)
                reason = string.Create(CultureInfo.InvariantCulture,
                    $"the host's state occupies {RetentionLimits.Mib(total)}, over the limit of {RetentionLimits.Mib(limits.MaxTotalBytes)}, and this guest's changed longest ago ({age.TotalDays:0.#} days)");
            if (reason is null)
                continue;
            chosen.Add(new Eviction(c.Uuid, c.Cost.Evictable, reason));
            total -= c.Cost.Evictable;
        }
        return chosen;
    }
}
