using System.Collections.Concurrent;
using System.Xml;
using System.Xml.Linq;

namespace BFMig.Daemon.Guests;

/// <summary>
/// The last domain XML seen per guest, so that a stream's path never waits on libvirt: on
/// libvirt 11.3 a live <c>virDomainGetXMLDesc</c> during a migration waits for the migration's
/// monitor job (the NBD <c>blockdev-add</c>), which waits for the very connection being set
/// up: 30 s of deadlock until libvirt's job timeout. Filled from the hook's XML (the incoming
/// domain on a destination) and in the background after lifecycle events and reconnects.
/// </summary>
public sealed class DomainXmlCache
{
    /// <summary>How long a stream's path waits for libvirt when nothing is cached.</summary>
    public static readonly TimeSpan QueryBudget = TimeSpan.FromSeconds(2);

    private readonly ConcurrentDictionary<Guid, string> _xml = new();

    /// <summary>Keeps a domain XML under its own top-level &lt;uuid&gt;; ignores text that is not one.</summary>
    public void Remember(string domainXml)
    {
        if (string.IsNullOrWhiteSpace(domainXml))
            return;
        try
        {
            var root = XElement.Parse(domainXml);
            if (root.Name.LocalName == "domain" && Guid.TryParse(root.Element("uuid")?.Value, out var uuid))
                _xml[uuid] = domainXml;
        }
        catch (XmlException)
        {
            // Not ours to judge here: the split-brain guard reads the same text and says what is wrong.
        }
    }

    /// <summary>Queries libvirt off the caller's thread and keeps the answer.</summary>
    public void RefreshInBackground(Guid uuid, Func<Guid, string?> query) =>
        _ = Task.Run(() =>
        {
            if (query(uuid) is { } xml)
                _xml[uuid] = xml;
        });

    /// <summary>
    /// The cached XML; without one, asks <paramref name="query"/> for at most
    /// <see cref="QueryBudget"/> (the answer is kept when it comes later). Null when unknown.
    /// </summary>
    public string? Get(Guid uuid, Func<Guid, string?>? query)
    {
        if (_xml.TryGetValue(uuid, out var xml) || query is null)
            return xml;
        var pending = Task.Run(() =>
        {
            var answer = query(uuid);
            if (answer is not null)
                _xml[uuid] = answer;
            return answer;
        });
        return pending.Wait(QueryBudget) ? pending.Result : null;
    }
}
