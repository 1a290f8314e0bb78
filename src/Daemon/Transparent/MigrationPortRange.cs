using System.Globalization;

namespace BFMig.Daemon.Transparent;

/// <summary>
/// The TCP ports libvirt gives a destination QEMU for the migration stream and the NBD server of
/// the disk mirror: qemu.conf's <c>migration_port_min..migration_port_max</c> (libvirt's defaults
/// 49152-49215 when unset). Only these ports, towards configured peers, are redirected.
/// </summary>
public sealed record MigrationPortRange(int Min, int Max)
{
    public const string DefaultQemuConf = "/etc/libvirt/qemu.conf";
    public static readonly MigrationPortRange LibvirtDefault = new(49152, 49215);

    /// <summary>
    /// Reads the range from a qemu.conf; a missing file or unset keys give libvirt's defaults. A
    /// value libvirt itself would reject (not a port, min above max) throws <see cref="FormatException"/>
    /// naming the key, so that the operator hears of it instead of a silently different range.
    /// </summary>
    public static MigrationPortRange Read(string path)
    {
        string[] lines;
        try
        {
            lines = File.ReadAllLines(path);
        }
        catch (FileNotFoundException)
        {
            return LibvirtDefault;
        }
        catch (DirectoryNotFoundException)
        {
            return LibvirtDefault;
        }
        int min = LibvirtDefault.Min, max = LibvirtDefault.Max;
        foreach (var raw in lines)
        {
            var line = raw.Split('#', 2)[0].Trim();
            int eq = line.IndexOf('=', StringComparison.Ordinal);
            if (eq <= 0)
                continue;
            var key = line[..eq].Trim();
            if (key is not ("migration_port_min" or "migration_port_max"))
                continue;
            var value = line[(eq + 1)..].Trim();
            if (!int.TryParse(value, NumberStyles.None, CultureInfo.InvariantCulture, out int port) || port is < 1 or > 65535)
                throw new FormatException($"{path}: {key} = {value} is not a TCP port");
            if (key == "migration_port_min")
                min = port;
            else
                max = port;
        }
        if (min > max)
            throw new FormatException($"{path}: migration_port_min {min} is above migration_port_max {max}");
        return new MigrationPortRange(min, max);
    }

    public bool Contains(int port) => port >= Min && port <= Max;

    public override string ToString() => $"{Min.ToString(CultureInfo.InvariantCulture)}-{Max.ToString(CultureInfo.InvariantCulture)}";
}
