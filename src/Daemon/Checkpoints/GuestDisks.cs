using System.Text.Json;
using System.Xml;
using System.Xml.Linq;

namespace BFMig.Daemon.Checkpoints;

/// <summary>One disk of a guest as its domain XML describes it.</summary>
/// <param name="Target">The disk's target (<c>vda</c>), the name checkpoints use.</param>
/// <param name="Alias">libvirt's device alias (<c>virtio-disk0</c>) on a running guest, else null.</param>
/// <param name="File">The image file, null for non-file sources.</param>
/// <param name="Format">The driver type (<c>qcow2</c>, <c>raw</c>).</param>
public sealed record GuestDisk(string Target, string? Alias, string? File, string Format)
{
    /// <summary>The disks (device='disk') of a domain XML, in document order.</summary>
    public static IReadOnlyList<GuestDisk> FromDomainXml(string xml)
    {
        XElement root;
        try
        {
            using var reader = XmlReader.Create(new StringReader(xml), new XmlReaderSettings { DtdProcessing = DtdProcessing.Prohibit, XmlResolver = null });
            root = XElement.Load(reader);
        }
        catch (XmlException e)
        {
            throw new CheckpointSetException($"domain XML is malformed at line {e.LineNumber}: {e.Message}");
        }
        var disks = new List<GuestDisk>();
        foreach (var disk in root.Element("devices")?.Elements("disk") ?? [])
        {
            if (((string?)disk.Attribute("device") ?? "disk") != "disk")
                continue;
            var target = (string?)disk.Element("target")?.Attribute("dev");
            if (string.IsNullOrEmpty(target))
                continue;
            var file = (string?)disk.Attribute("type") == "file" ? (string?)disk.Element("source")?.Attribute("file") : null;
            disks.Add(new GuestDisk(target, (string?)disk.Element("alias")?.Attribute("name"), file,
                (string?)disk.Element("driver")?.Attribute("type") ?? "raw"));
        }
        return disks;
    }
}

/// <summary>The guest's memory size from its domain XML (<c>currentMemory</c>, else <c>memory</c>).</summary>
public static class GuestMemory
{
    /// <summary>Bytes, or null when the XML names no memory size or an unknown unit.</summary>
    public static ulong? FromDomainXml(string xml)
    {
        var root = XElement.Parse(xml);
        var element = root.Element("currentMemory") ?? root.Element("memory");
        if (element is null || !ulong.TryParse(element.Value.Trim(), System.Globalization.NumberStyles.None, System.Globalization.CultureInfo.InvariantCulture, out var value))
            return null;
        ulong? scale = ((string?)element.Attribute("unit") ?? "KiB") switch
        {
            "b" or "bytes" => 1,
            "KiB" or "k" => 1UL << 10,
            "MiB" or "M" => 1UL << 20,
            "GiB" or "G" => 1UL << 30,
            "TiB" or "T" => 1UL << 40,
            _ => null,
        };
        return scale is { } s ? value * s : null;
    }
}

/// <summary>A dirty bitmap of a block node as QEMU reports it (<c>query-block</c>).</summary>
public sealed record NodeBitmap(string Name, ulong Count, ulong Granularity, bool Persistent, bool Recording, bool Inconsistent);

/// <summary>A block device of a running QEMU: its qdev path, the top node and that node's bitmaps.</summary>
public sealed record QemuBlockDevice(string Qdev, string NodeName, IReadOnlyList<NodeBitmap> Bitmaps)
{
    /// <summary>Reads the reply of <c>{"execute":"query-block"}</c>; devices without a medium are left out.</summary>
    public static IReadOnlyList<QemuBlockDevice> FromQueryBlock(string reply)
    {
        using var doc = JsonDocument.Parse(reply);
        if (!doc.RootElement.TryGetProperty("return", out var list) || list.ValueKind != JsonValueKind.Array)
            throw new CheckpointSetException($"query-block reply has no return list: {Shorten(reply)}");
        var devices = new List<QemuBlockDevice>();
        foreach (var device in list.EnumerateArray())
        {
            if (!device.TryGetProperty("inserted", out var inserted) || !inserted.TryGetProperty("node-name", out var node))
                continue;
            var bitmaps = new List<NodeBitmap>();
            if (inserted.TryGetProperty("dirty-bitmaps", out var dirty) && dirty.ValueKind == JsonValueKind.Array)
            {
                foreach (var b in dirty.EnumerateArray())
                {
                    bitmaps.Add(new NodeBitmap(b.GetProperty("name").GetString() ?? "", b.GetProperty("count").GetUInt64(),
                        b.TryGetProperty("granularity", out var g) ? g.GetUInt64() : 0,
                        b.TryGetProperty("persistent", out var p) && p.GetBoolean(),
                        b.TryGetProperty("recording", out var r) && r.GetBoolean(),
                        b.TryGetProperty("inconsistent", out var i) && i.GetBoolean()));
                }
            }
            var qdev = device.TryGetProperty("qdev", out var q) ? q.GetString() ?? "" : "";
            devices.Add(new QemuBlockDevice(qdev, node.GetString() ?? "", bitmaps));
        }
        return devices;
    }

    /// <summary>The device of a disk with libvirt alias <paramref name="alias"/> (qdev <c>/machine/peripheral/ALIAS/...</c>).</summary>
    public static QemuBlockDevice? ForAlias(IReadOnlyList<QemuBlockDevice> devices, string? alias) =>
        alias is null ? null : devices.FirstOrDefault(d => d.Qdev.Contains($"/peripheral/{alias}/", StringComparison.Ordinal) || d.Qdev == alias);

    internal static string Shorten(string text) => text.Length <= 200 ? text : text[..200] + "...";
}
