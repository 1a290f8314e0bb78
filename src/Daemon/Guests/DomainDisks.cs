using System.Globalization;
using System.Xml;
using BFMig.Transfer.Disk;

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

/// <summary>Any disk (<c>device='disk'</c>) of a domain, whatever its source.</summary>
/// <param name="Target">The guest's device name.</param>
/// <param name="SourceType">The disk's <c>type</c>: <c>file</c>, <c>block</c>, <c>network</c>, <c>volume</c>, ...</param>
/// <param name="Protocol">For a network disk its protocol (<c>rbd</c>, <c>nbd</c>, <c>iscsi</c>, <c>gluster</c>), else "".</param>
/// <param name="File">The usable image of a file-backed or block-device disk (absolute path, QEMU format name), else null.</param>
/// <param name="ExportNames">The NBD export names libvirt may give the disk (see <see cref="DomainDisk"/>).</param>
public sealed record DomainDiskSource(string Target, string SourceType, string Protocol, DiskImageSpec? File, IReadOnlyList<string> ExportNames);

/// <summary>
/// Reads the disks of a domain XML (the live one: aliases and indexes are assigned when the
/// guest starts). File-backed disks and block devices (<c>type='block'</c>: LVM volumes,
/// partitions) are named to helpers; a block device's timestamps do not move when it is written,
/// so no identity can prove it unwritten and a receiver re-hashes it instead (DiskRehash, which
/// also checks its path and owner). A network disk is shared storage by nature (see
/// <see cref="ImageCustody"/>).
/// </summary>
public static class DomainDisks
{
    /// <summary>The file-backed and block-device disks of <paramref name="domainXml"/>; an XML that does not parse has none.</summary>
    public static IReadOnlyList<DomainDisk> Parse(string domainXml) =>
        [.. Describe(domainXml).Where(d => d.File is not null && d.ExportNames.Count > 0).Select(d => new DomainDisk(d.Target, d.File!, d.ExportNames))];

    /// <summary>Every disk of <paramref name="domainXml"/> (not cdroms or floppies); an XML that does not parse has none.</summary>
    public static IReadOnlyList<DomainDiskSource> Describe(string domainXml)
    {
        var result = new List<DomainDiskSource>();
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
            var type = disk.GetAttribute("type");
            var source = disk["source"];
            string path = type switch
            {
                "file" => source?.GetAttribute("file") ?? "",
                "block" => source?.GetAttribute("dev") ?? "",
                _ => "",
            };
            string format = disk["driver"]?.GetAttribute("type") ?? "";
            string target = disk["target"]?.GetAttribute("dev") ?? "";
            var names = new List<string>();
            if (disk["alias"]?.GetAttribute("name") is { Length: > 0 } alias)
                names.Add("drive-" + alias);
            if (source is not null && int.TryParse(source.GetAttribute("index"), NumberStyles.None, CultureInfo.InvariantCulture, out int index))
            {
                names.Add($"libvirt-{index}-storage");
                names.Add($"libvirt-{index}-format");
            }
            var file = path.StartsWith('/') && format.Length > 0 && format.All(char.IsAsciiLetterOrDigit) ? new DiskImageSpec(path, format) : null;
            var name = target.Length > 0 ? target : names.FirstOrDefault() ?? "";
            result.Add(new DomainDiskSource(name, type, type == "network" ? source?.GetAttribute("protocol") ?? "" : "", file, names));
        }
        return result;
    }
}
