using System.Globalization;

namespace BFMig.Transfer.Memory;

/// <summary>
/// How much RAM a peer may declare for a guest it migrates here: the guest's memory as the
/// incoming domain's XML sets it, plus <see cref="DeviceAllowance"/> for the RAM blocks that are
/// not guest memory (firmware, option ROMs, video memory, ACPI tables).
/// </summary>
public static class RamLimit
{
    /// <summary>Room for device RAM blocks beyond the guest's memory (a qxl card's video RAM is the largest seen: 64-256 MiB).</summary>
    public const long DeviceAllowance = 1L << 30;

    /// <summary>The limit for a guest with <paramref name="guestMemoryBytes"/> of memory.</summary>
    public static long ForGuest(long guestMemoryBytes) => guestMemoryBytes <= 0 ? ForHost() : guestMemoryBytes + DeviceAllowance;

    /// <summary>Without the domain's memory: no guest here can be larger than this host's physical memory.</summary>
    public static long ForHost() => HostMemoryBytes() + DeviceAllowance;

    private static long HostMemoryBytes()
    {
        try
        {
            foreach (var line in File.ReadLines("/proc/meminfo"))
            {
                // "MemTotal:       16318152 kB"
                if (!line.StartsWith("MemTotal:", StringComparison.Ordinal)) continue;
                var parts = line.Split(' ', StringSplitOptions.RemoveEmptyEntries);
                if (parts.Length >= 2 && long.TryParse(parts[1], NumberStyles.None, CultureInfo.InvariantCulture, out long kib))
                    return kib * 1024;
            }
        }
        catch (IOException)
        {
            // No /proc: the fixed bound below still keeps the store's allocations sane.
        }
        return 1L << 40;
    }
}
