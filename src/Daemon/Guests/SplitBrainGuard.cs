using System.Collections.Concurrent;
using System.Xml;

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
/// Refuses to start a guest on this host while BFMig knows it runs on a peer: after
/// <c>virsh migrate --persistent</c> without <c>--undefinesource</c> the definition stays here,
/// and booting it would fork the guest and corrupt what this host retained. An incoming
/// migration of the guest is told apart by the <c>migrate begin</c> hook libvirt runs on the
/// destination just before <c>prepare</c>: it is remembered for <see cref="IncomingWindow"/>.
/// </summary>
public sealed class SplitBrainGuard(GuestStateStore store, string hostName, TimeProvider time)
{
    /// <summary>How long a <c>migrate begin</c> lets a following prepare/start through.</summary>
    public static readonly TimeSpan IncomingWindow = TimeSpan.FromMinutes(2);

    /// <summary>
    /// How long after the hook announced an incoming migration (<c>migrate begin</c> or
    /// <c>prepare begin</c>) the peer port takes a first stream of that guest. Streams that
    /// connect later in a long trip (the memory stream after a long disk mirror) are let in by the
    /// trip's running streams instead (<see cref="Transfers.TransferManager.IsReceiving"/>).
    /// </summary>
    public static readonly TimeSpan StreamWindow = TimeSpan.FromMinutes(5);

    private readonly ConcurrentDictionary<string, DateTimeOffset> _incoming = new(StringComparer.Ordinal);
    private readonly ConcurrentDictionary<Guid, DateTimeOffset> _expectedStreams = new();

    /// <summary>Raised when the hook announces an incoming migration (guest name).</summary>
    public event Action<string>? IncomingMigrationAnnounced;

    /// <summary>Decides one hook call. Reads local files only: libvirt waits for the hook, so no libvirt call may be made here.</summary>
    public HookDecision Decide(string guest, string operation, string subOperation, string domainXml)
    {
        var key = KeyOf(guest, domainXml);
        switch (operation)
        {
            case "migrate" when subOperation == "begin":
                _incoming[key] = time.GetUtcNow();
                ExpectStreams(key);
                IncomingMigrationAnnounced?.Invoke(guest);
                return HookDecision.Allowed;
            case "prepare" or "start" when subOperation == "begin":
                var decision = CheckStart(guest, key, operation);
                if (decision.Allow && operation == "prepare")
                    ExpectStreams(key);
                return decision;
            case "started":
                // The incoming QEMU runs (paused): its streams connect only now, so they stay expected.
                _incoming.TryRemove(key, out _);
                return HookDecision.Allowed;
            case "release" or "stopped":
                _incoming.TryRemove(key, out _);
                if (Guid.TryParse(key, out var gone))
                    _expectedStreams.TryRemove(gone, out _);
                return HookDecision.Allowed;
            default:
                return HookDecision.Allowed;
        }
    }

    /// <summary>True while an incoming migration of the guest (UUID or name) is announced and not over.</summary>
    public bool IsIncoming(string key) =>
        _incoming.TryGetValue(key, out var since) && time.GetUtcNow() - since <= IncomingWindow;

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

    private HookDecision CheckStart(string guest, string key, string operation)
    {
        if (IsIncoming(key))
            return HookDecision.Allowed;
        if (!Guid.TryParse(key, out var uuid))
            return HookDecision.Allowed;
        var state = store.ReadState(uuid);
        if (state is null || state.Location != "away" || state.Peer == hostName)
            return HookDecision.Allowed;
        var where = string.IsNullOrEmpty(state.Peer) ? "another host" : $"host {state.Peer}";
        var since = state.Since == default ? "" : $" since {state.Since.UtcDateTime:yyyy-MM-dd HH:mm:ss} UTC";
        return new HookDecision(false,
            $"bfmig: refusing to {operation} guest {guest}: it migrated to {where} and runs there{since}. Starting it here too " +
            $"would fork it and corrupt its retained state. If it really is no longer running on {where}, run " +
            $"`bfmig forget {guest}` on this host, then start it again.", "");
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
