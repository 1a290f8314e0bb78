using System.Globalization;
using System.Xml;
using System.Xml.Linq;

namespace BFMig.Daemon.Checkpoints;

/// <summary>A checkpoint's metadata was unusable (bad XML, a parent loop, too much of it).</summary>
public sealed class CheckpointSetException(string message) : Exception(message);

/// <summary>One disk of a checkpoint: the disk target (<c>vda</c>) and the qcow2 bitmap that backs it.</summary>
public sealed record CheckpointDisk(string Disk, string Bitmap);

/// <summary>
/// One libvirt checkpoint as carried between hosts: its XML exactly as
/// <c>virDomainCheckpointGetXMLDesc</c> gave it (what <c>REDEFINE</c> takes back) and the
/// fields the daemon needs from it.
/// </summary>
public sealed record CheckpointRecord(string Name, string? Parent, long CreationTime, IReadOnlyList<CheckpointDisk> Disks, string Xml)
{
    /// <summary>Largest checkpoint XML accepted (it embeds the domain XML, a few KiB).</summary>
    public const int MaxXmlBytes = 1 << 20;

    /// <summary>Reads name, parent, creation time and the bitmap disks of a <c>&lt;domaincheckpoint&gt;</c>.</summary>
    public static CheckpointRecord Parse(string xml)
    {
        ArgumentNullException.ThrowIfNull(xml);
        if (xml.Length > MaxXmlBytes)
            throw new CheckpointSetException($"checkpoint XML of {xml.Length} characters exceeds {MaxXmlBytes}");
        XElement root;
        try
        {
            using var reader = XmlReader.Create(new StringReader(xml), new XmlReaderSettings { DtdProcessing = DtdProcessing.Prohibit, XmlResolver = null });
            root = XElement.Load(reader);
        }
        catch (XmlException e)
        {
            throw new CheckpointSetException($"checkpoint XML is malformed at line {e.LineNumber}, column {e.LinePosition}: {e.Message}");
        }
        if (root.Name.LocalName != "domaincheckpoint")
            throw new CheckpointSetException($"checkpoint XML has root <{root.Name.LocalName}>, expected <domaincheckpoint>");
        var name = root.Element("name")?.Value.Trim();
        if (string.IsNullOrEmpty(name))
            throw new CheckpointSetException("checkpoint XML has no <name>");
        var parent = root.Element("parent")?.Element("name")?.Value.Trim();
        long created = 0;
        if (root.Element("creationTime")?.Value is { } text
            && !long.TryParse(text.Trim(), NumberStyles.None, CultureInfo.InvariantCulture, out created))
            throw new CheckpointSetException($"checkpoint {name}: <creationTime> '{text}' is not a number");
        var disks = new List<CheckpointDisk>();
        foreach (var disk in root.Element("disks")?.Elements("disk") ?? [])
        {
            if ((string?)disk.Attribute("checkpoint") is "no")
                continue;
            var target = (string?)disk.Attribute("name");
            if (string.IsNullOrEmpty(target))
                throw new CheckpointSetException($"checkpoint {name}: a <disk> has no name");
            disks.Add(new CheckpointDisk(target, (string?)disk.Attribute("bitmap") ?? name));
        }
        return new CheckpointRecord(name, string.IsNullOrEmpty(parent) ? null : parent, created, disks, xml);
    }
}

/// <summary>Puts checkpoints in the order <c>REDEFINE</c> needs: every parent before its children.</summary>
public static class CheckpointOrder
{
    /// <summary>Most checkpoints carried for one guest.</summary>
    public const int MaxCheckpoints = 4096;

    /// <summary>
    /// Parents first; among checkpoints whose parents are placed, the older (creation time, then
    /// name) first, so the result does not depend on the order libvirt listed them in. A parent
    /// that is not in the set is treated as absent (its child becomes a root and its redefinition
    /// reports the missing parent). Throws <see cref="CheckpointSetException"/> for duplicate
    /// names and parent loops.
    /// </summary>
    public static IReadOnlyList<CheckpointRecord> ParentsFirst(IEnumerable<CheckpointRecord> checkpoints)
    {
        var byName = new Dictionary<string, CheckpointRecord>(StringComparer.Ordinal);
        foreach (var c in checkpoints)
        {
            if (!byName.TryAdd(c.Name, c))
                throw new CheckpointSetException($"checkpoint {c.Name} appears twice");
            if (byName.Count > MaxCheckpoints)
                throw new CheckpointSetException($"more than {MaxCheckpoints} checkpoints");
        }
        var children = new Dictionary<string, List<CheckpointRecord>>(StringComparer.Ordinal);
        var ready = new PriorityQueue<CheckpointRecord, (long, string)>(Comparer<(long Time, string Name)>.Create(
            (a, b) => a.Time != b.Time ? a.Time.CompareTo(b.Time) : string.CompareOrdinal(a.Name, b.Name)));
        foreach (var c in byName.Values)
        {
            if (c.Parent is { } p && byName.ContainsKey(p))
            {
                if (!children.TryGetValue(p, out var list))
                    children[p] = list = [];
                list.Add(c);
            }
            else
            {
                ready.Enqueue(c, (c.CreationTime, c.Name));
            }
        }
        var result = new List<CheckpointRecord>(byName.Count);
        while (ready.TryDequeue(out var c, out _))
        {
            result.Add(c);
            foreach (var child in children.GetValueOrDefault(c.Name) ?? [])
                ready.Enqueue(child, (child.CreationTime, child.Name));
        }
        if (result.Count != byName.Count)
        {
            var stuck = byName.Keys.Except(result.Select(r => r.Name), StringComparer.Ordinal).Order(StringComparer.Ordinal);
            throw new CheckpointSetException($"checkpoints {string.Join(", ", stuck)} are their own ancestors (parent loop)");
        }
        return result;
    }
}
