using System.Globalization;
using System.Xml;
using BFMig.Transfer.Engine;

namespace BFMig.Daemon.Guests;

/// <summary>One disk of a domain whose image BFMig can name to the transfer helper.</summary>
/// <param name="Target">The guest's device name (<c>&lt;target dev='vda'/&gt;</c>), used in progress signals.</param>
/// <param name="Image">Image file and format.</param>
/// <param name="ExportNames">
/// Every NBD export name libvirt may give this disk in a storage migration: <c>drive-ALIAS</c>
/// (libvirt's disk alias with the drive prefix), and with <c>-blockdev</c> the node names
/// <c>libvirt-INDEX-storage</c> and <c>libvirt-INDEX-format</c>. Each belongs to this disk alone.
/// </param>
public sealed record DomainDisk(string Target, DiskImageSpec Image, IReadOnlyList<string> ExportNames);

/// <summary>
/// Reads the disks of a domain XML (the live one: aliases and indexes are assigned when the
/// guest starts). Only file-backed disks are named: a block device's mtime does not change when
/// it is written, so its identity could not tell that it was touched, and it is always sent whole.
/// </summary>
public static class DomainDisks
{
    /// <summary>The file-backed disks of <paramref name="domainXml"/>; an XML that does not parse has none.</summary>
    public static IReadOnlyList<DomainDisk> Parse(string domainXml)
    {
        var result = new List<DomainDisk>();
        var doc = new XmlDocument { XmlResolver = null };
        try
        {
            using var reader = XmlReader.Create(new StringReader(domainXml), new XmlReaderSettings { DtdProcessing = DtdProcessing.Prohibit, XmlResolver = null });
            doc.Load(reader);
        }
        catch (XmlException)
        {
            return result;
        }
        var disks = doc.SelectNodes("/domain/devices/disk[@device='disk' or not(@device)]");
        if (disks is null)
            return result;
        foreach (XmlElement disk in disks)
        {
            if (disk.GetAttribute("type") != "file")
                continue;
            var source = disk["source"];
            string path = source?.GetAttribute("file") ?? "";
            string format = disk["driver"]?.GetAttribute("type") ?? "";
            string target = disk["target"]?.GetAttribute("dev") ?? "";
            if (!path.StartsWith('/') || format.Length == 0 || !format.All(char.IsAsciiLetterOrDigit))
                continue;
            var names = new List<string>();
            if (disk["alias"]?.GetAttribute("name") is { Length: > 0 } alias)
                names.Add("drive-" + alias);
            if (int.TryParse(source!.GetAttribute("index"), NumberStyles.None, CultureInfo.InvariantCulture, out int index))
            {
                names.Add($"libvirt-{index}-storage");
                names.Add($"libvirt-{index}-format");
            }
            if (names.Count > 0)
                result.Add(new DomainDisk(target.Length > 0 ? target : names[0], new DiskImageSpec(path, format), names));
        }
        return result;
    }
}
