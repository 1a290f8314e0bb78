using System.Collections.Concurrent;
using System.Xml;
using BFMig.Contracts;

namespace BFMig.Daemon.Guests;

/// <summary>The daemon's answer to one hook invocation.</summary>
/// <param name="Allow">False aborts the libvirt operation (the hook exits non-zero).</param>
/// <param name="Message">Why, for a refusal (the hook prints it; libvirt shows it to the user).</param>
/// <param name="XmlOut">For <c>migrate</c>: the XML to print back; "" means unchanged.</param>
public sealed record HookDecision(bool Allow, string Message, string XmlOut)
{
    public static readonly HookDecision Allowed = new(true, "", "");
}

/// <summary>
/// The daemon's side of <see cref="SplitBrainRule"/> (the hook applies the same rule when the
/// daemon does not answer): the announced incoming migrations live here, the location record in
/// the store. Also remembers which incoming streams the peer port may take.
/// </summary>
public sealed class SplitBrainGuard(GuestStateStore store, TimeProvider time)
{
    /// <summary>
    /// How long after the hook announced an incoming migration (<c>migrate begin</c> or
    /// <c>prepare begin</c>) the peer port takes a first stream of that guest. Streams that
    /// connect later in a long trip (the memory stream after a long disk mirror) are let in by the
    /// trip's running streams instead (<see cref="Transfers.TransferManager.ReceivingFrom"/>).
    /// </summary>
    public static readonly TimeSpan StreamWindow = TimeSpan.FromMinutes(5);

    private readonly ConcurrentDictionary<string, IncomingAnnouncement> _incoming = new(StringComparer.Ordinal);
    private readonly ConcurrentDictionary<Guid, DateTimeOffset> _expectedStreams = new();

    /// <summary>Raised when a guest's record exists but cannot be used for the rule (the warning to log).</summary>
    public event Action<string>? UnusableRecord;

    /// <summary>Raised when the hook announces an incoming migration (guest name).</summary>
    public event Action<string>? IncomingMigrationAnnounced;

    /// <summary>Decides one hook call. Reads local files only: libvirt waits for the hook, so no libvirt call may be made here.</summary>
    public HookDecision Decide(string guest, string operation, string subOperation, string domainXml)
    {
        var key = KeyOf(guest, domainXml);
        var step = SplitBrainRule.Classify(operation, subOperation);
        if (step == SplitBrainRule.Step.Other)
            return HookDecision.Allowed;
        IncomingAnnouncement? announcement = _incoming.TryGetValue(key, out var known) ? known : null;
        var (record, problem) = step is SplitBrainRule.Step.Prepare or SplitBrainRule.Step.Start && Guid.TryParse(key, out var uuid)
            ? store.ReadLocation(uuid)
            : (null, null);
        if (problem is not null)
            UnusableRecord?.Invoke(SplitBrainRule.UnusableRecordWarning(guest, operation, problem));
        var refusal = SplitBrainRule.Apply(guest, operation, subOperation, record, problem, ref announcement, time.GetUtcNow());
        if (announcement is { } next)
            _incoming[key] = next;
        else
            _incoming.TryRemove(key, out _);
        switch (step)
        {
            case SplitBrainRule.Step.Announce:
                ExpectStreams(key);
                IncomingMigrationAnnounced?.Invoke(guest);
                break;
            case SplitBrainRule.Step.Prepare when refusal is null:
                ExpectStreams(key);
                break;
            // "started": the incoming QEMU runs (paused), its streams connect only now, so they stay expected.
            case SplitBrainRule.Step.End when operation is "release" or "stopped" && Guid.TryParse(key, out var gone):
                _expectedStreams.TryRemove(gone, out _);
                break;
        }
        // The hook prefixes what it prints with "bfmig: ".
        return refusal is null ? HookDecision.Allowed : new HookDecision(false, refusal, "");
    }

    /// <summary>True while an incoming migration of the guest (UUID or name) is announced and not over.</summary>
    public bool IsIncoming(string key) =>
        _incoming.TryGetValue(key, out var a) && time.GetUtcNow() - a.At <= SplitBrainRule.IncomingWindow;

    /// <summary>
    /// True while this host's own hook announced an incoming migration of the guest within
    /// <see cref="StreamWindow"/>: only then does the peer port hand a stream of it to a helper.
    /// </summary>
    public bool ExpectsStreams(Guid uuid) =>
        _expectedStreams.TryGetValue(uuid, out var since) && time.GetUtcNow() - since <= StreamWindow;

    private void ExpectStreams(string key)
    {
        if (Guid.TryParse(key, out var uuid))
            _expectedStreams[uuid] = time.GetUtcNow();
    }

    /// <summary>The guest's UUID from the domain XML (the hook's stdin), or its name when the XML has none.</summary>
    internal static string KeyOf(string guest, string domainXml)
    {
        if (string.IsNullOrWhiteSpace(domainXml))
            return guest;
        try
        {
            using var reader = XmlReader.Create(new StringReader(domainXml), new XmlReaderSettings { DtdProcessing = DtdProcessing.Prohibit, XmlResolver = null });
            // <domain><uuid>..</uuid>: only the top level, not a <uuid> of some nested element.
            while (reader.Read())
            {
                if (reader is { NodeType: XmlNodeType.Element, Depth: 1, LocalName: "uuid" })
                    return Guid.TryParse(reader.ReadElementContentAsString(), out var uuid) ? uuid.ToString("D") : guest;
            }
            return guest;
        }
        catch (XmlException)
        {
            return guest;
        }
    }
}
