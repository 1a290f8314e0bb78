namespace BFMig.Contracts;

/// <summary>An incoming migration the hook announced (<c>migrate begin</c>) and that has not started yet.</summary>
/// <param name="At">When <c>migrate begin</c> ran.</param>
/// <param name="Prepared">True once it let a <c>prepare begin</c> through (it lets in one).</param>
public readonly record struct IncomingAnnouncement(DateTimeOffset At, bool Prepared);

/// <summary>
/// The split-brain rule, applied by bfmigd when it answers the hook and by the hook itself when
/// bfmigd does not answer, so that the answer does not depend on which of the two decided.
/// <para>
/// After <c>virsh migrate --persistent</c> without <c>--undefinesource</c> the guest's definition
/// stays on the source, and booting it there would fork the guest and corrupt what the host
/// retained. So a guest whose <see cref="LocationRecord"/> says it may run elsewhere
/// (<see cref="LocationRecord.MayRunElsewhere"/>: away, or leaving and not yet confirmed) is
/// refused at <c>prepare begin</c> and <c>start begin</c>, the hook points every boot, restore and
/// incoming migration passes. So is a guest whose record exists but cannot be read or parsed: it
/// may say away, and guessing "here" would disable the guard exactly when its state is in doubt;
/// <c>bfmig forget GUEST</c> clears it. Prepare alone would do; start is checked too so that nothing that
/// reaches start without a passed prepare slips through.
/// </para>
/// <para>
/// The exception is an incoming migration: libvirt runs <c>migrate begin</c> on the destination
/// just before prepare and start, all within one Prepare call. That announcement lets one prepare
/// and the start after it through, for <see cref="IncomingWindow"/>, and is used up at
/// <c>started</c>, <c>release</c> or <c>stopped</c>. One prepare only, and a short window: a stale or
/// reused announcement must not let an ordinary boot of the stale copy through.
/// There is no exemption for a record naming this host as the peer: a peer can never carry this
/// host's name (bfmigd refuses such a configuration), and the hook could not know the name anyway.
/// </para>
/// </summary>
public static class SplitBrainRule
{
    /// <summary>How long a <c>migrate begin</c> lets the following prepare/start through.</summary>
    public static readonly TimeSpan IncomingWindow = TimeSpan.FromMinutes(2);

    /// <summary>What a hook call means for the rule.</summary>
    public enum Step
    {
        /// <summary>Nothing the rule looks at.</summary>
        Other,

        /// <summary><c>migrate begin</c>: an incoming migration is announced.</summary>
        Announce,

        /// <summary><c>prepare begin</c>: the guest is about to be set up here (boot, restore or incoming migration).</summary>
        Prepare,

        /// <summary><c>start begin</c>: its QEMU is about to start.</summary>
        Start,

        /// <summary><c>started</c>, <c>release</c>, <c>stopped</c>: an announcement is used up.</summary>
        End,
    }

    /// <summary>Classifies one hook call (libvirt's operation and sub-operation).</summary>
    public static Step Classify(string operation, string subOperation) => (operation, subOperation) switch
    {
        ("migrate", "begin") => Step.Announce,
        ("prepare", "begin") => Step.Prepare,
        ("start", "begin") => Step.Start,
        ("started" or "release" or "stopped", _) => Step.End,
        _ => Step.Other,
    };

    /// <summary>
    /// Applies the rule to one hook call.
    /// </summary>
    /// <param name="guest">The guest's name (for the message).</param>
    /// <param name="operation">libvirt's hook operation.</param>
    /// <param name="subOperation">libvirt's hook sub-operation.</param>
    /// <param name="record">The guest's location record, null when BFMig knows nothing of it or it cannot be read.</param>
    /// <param name="recordProblem">Why the record that exists cannot be read (it names the file), else null.</param>
    /// <param name="announcement">The guest's announced incoming migration, if any; replaced by what to keep after this call.</param>
    /// <param name="now">The clock.</param>
    /// <returns>Null to allow, else the refusal to show the user.</returns>
    public static string? Apply(string guest, string operation, string subOperation, LocationRecord? record, string? recordProblem,
        ref IncomingAnnouncement? announcement, DateTimeOffset now)
    {
        var step = Classify(operation, subOperation);
        if (announcement is { } a && (now - a.At > IncomingWindow || a.At - now > TimeSpan.FromMinutes(1)))
            announcement = null;
        switch (step)
        {
            case Step.Announce:
                announcement = new IncomingAnnouncement(now, Prepared: false);
                return null;
            case Step.End:
                announcement = null;
                return null;
            case Step.Prepare when announcement is { Prepared: false } fresh:
                announcement = fresh with { Prepared = true };
                return null;
            case Step.Start when announcement is not null:
                return null;
            case Step.Prepare or Step.Start:
                return Refusal(guest, operation, record, recordProblem);
            default:
                return null;
        }
    }

    /// <summary>What the hook prints and bfmigd logs when a guest's record cannot be used for the rule.</summary>
    public static string UnusableRecordWarning(string guest, string operation, string recordProblem) =>
        $"warning: {recordProblem}; not applying the split-brain guard to {operation} of guest {guest}: make sure it does not run on another host " +
        $"(`bfmig forget {guest}` clears the record)";

    private static string? Refusal(string guest, string operation, LocationRecord? record, string? recordProblem)
    {
        // A record BFMig cannot read is BFMig's own failure: like a daemon that is gone, it falls back
        // to stock behaviour (allow) rather than making the guest unstartable. It is never silent:
        // the caller says so with UnusableRecordWarning (the hook on stderr, bfmigd in its journal).
        if (recordProblem is not null || record is not { MayRunElsewhere: true })
            return null;
        // The peer is "" when the trip that took it away named none.
        var unknown = record.ElsewhereHost.Length == 0;
        var host = unknown ? "another host" : "host " + record.ElsewhereHost;
        var state = record.Place == GuestPlace.Away
            ? $"it migrated to {host} and runs on {(unknown ? "it" : record.ElsewhereHost)}" + (record.Since == default ? "" : $" since {record.Since.UtcDateTime:u}")
            : $"it was migrating to {host}, and libvirt has not confirmed whether it stayed here";
        return $"refusing to {operation} guest {guest}: {state}. Starting it here too would fork it and corrupt its retained state. " +
            $"If it really is not running on {host}, run `bfmig forget {guest}` on this host, then start it again.";
    }
}
