using System.Globalization;
using System.Xml;

namespace BFMig.Daemon.Guests;

/// <summary>
/// The most memory a domain can have (<c>&lt;memory&gt;</c>, or <c>&lt;maxMemory&gt;</c> with
/// memory hotplug): the receiving helper refuses a RAM layout a peer declares beyond it.
/// </summary>
public static class DomainMemory
{
    /// <summary>Bytes, or 0 when the XML does not say (the helper then bounds by this host's memory).</summary>
    public static long MaxBytes(string domainXml)
    {
        var doc = new XmlDocument { XmlResolver = null };
        try
        {
            using var reader = XmlReader.Create(new StringReader(domainXml), new XmlReaderSettings { DtdProcessing = DtdProcessing.Prohibit, XmlResolver = null });
            doc.Load(reader);
        }
        catch (XmlException)
        {
            return 0;
        }
        return Math.Max(Bytes(doc.SelectSingleNode("/domain/memory") as XmlElement), Bytes(doc.SelectSingleNode("/domain/maxMemory") as XmlElement));
    }

    private static long Bytes(XmlElement? e)
    {
        if (e is null || !long.TryParse(e.InnerText.Trim(), NumberStyles.None, CultureInfo.InvariantCulture, out long value))
            return 0;
        // libvirt's scaled integers (docs/formatdomain.rst, "Memory Allocation"); KiB when no unit is given.
        long scale = e.GetAttribute("unit") switch
        {
            "b" or "bytes" => 1,
            "" or "k" or "KiB" => 1L << 10,
            "KB" => 1000,
            "M" or "MiB" => 1L << 20,
            "MB" => 1000_000,
            "G" or "GiB" => 1L << 30,
            "GB" => 1000_000_000,
            "T" or "TiB" => 1L << 40,
            "TB" => 1000_000_000_000,
            _ => 0,
        };
        return value > long.MaxValue / Math.Max(scale, 1) ? 0 : value * scale;
    }
}
