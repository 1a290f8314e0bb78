using BFMig.Native.Libvirt;

namespace BFMig.Lab.Calls;

/// <summary>
/// <c>bfmig-lab-call nova --guest NAME --dest-uri URI --migrate-uri URI [--disk TARGET]... [--auto-converge]</c>:
/// OpenStack Nova's live block migration exactly as its libvirt driver makes it (Nova 26.x,
/// <c>nova/virt/libvirt/guest.py</c> migrate): virDomainMigrateToURI3 to the destination's
/// libvirt with <c>migrate_uri</c> (Nova builds <c>tcp://DEST</c> itself), <c>migrate_disks</c>,
/// <c>destination_xml</c> = <c>persistent_xml</c> = the migratable XML, <c>bandwidth</c> = 0, and
/// LIVE | PEER2PEER | UNDEFINE_SOURCE | PERSIST_DEST | NON_SHARED_INC (+ AUTO_CONVERGE). Runs on the
/// source host against <c>qemu:///system</c>. Exit 0 when libvirt reports success, 1 with its error.
/// </summary>
internal static class Program
{
    private static int Main(string[] args)
    {
        if (args.Length == 0 || args[0] != "nova")
        {
            Console.Error.WriteLine("usage: bfmig-lab-call nova --guest NAME --dest-uri URI --migrate-uri URI [--disk TARGET]... [--auto-converge] [--source-uri URI]");
            return 2;
        }
        string? guest = null, destUri = null, migrateUri = null, sourceUri = "qemu:///system";
        var disks = new List<string>();
        var flags = LibvirtMigrateFlags.Live | LibvirtMigrateFlags.PeerToPeer | LibvirtMigrateFlags.UndefineSource
            | LibvirtMigrateFlags.PersistDestination | LibvirtMigrateFlags.NonSharedIncremental;
        for (int i = 1; i < args.Length; i++)
        {
            string Value() => i + 1 < args.Length ? args[++i] : throw new ArgumentException($"{args[i]} needs a value");
            switch (args[i])
            {
                case "--guest": guest = Value(); break;
                case "--dest-uri": destUri = Value(); break;
                case "--migrate-uri": migrateUri = Value(); break;
                case "--source-uri": sourceUri = Value(); break;
                case "--disk": disks.Add(Value()); break;
                case "--auto-converge": flags |= LibvirtMigrateFlags.AutoConverge; break;
                default: Console.Error.WriteLine($"bfmig-lab-call: unknown option {args[i]}"); return 2;
            }
        }
        if (guest is null || destUri is null || migrateUri is null)
        {
            Console.Error.WriteLine("bfmig-lab-call nova: --guest, --dest-uri and --migrate-uri are required");
            return 2;
        }
        try
        {
            using var connection = LibvirtConnection.Open(sourceUri);
            using var domain = connection.LookupDomainByName(guest);
            var xml = domain.GetXmlDesc(LibvirtDomainXmlFlags.Migratable);
            var parameters = new LibvirtMigrationParameters
            {
                MigrateUri = migrateUri,
                MigrateDisks = disks,
                DestinationXml = xml,
                PersistentXml = xml,
                BandwidthMiBps = 0,
            };
            Console.Error.WriteLine($"bfmig-lab-call: virDomainMigrateToURI3({guest}, {destUri}, migrate_uri={migrateUri}, migrate_disks=[{string.Join(",", disks)}], flags={flags})");
            domain.MigrateToUri3(destUri, parameters, flags);
            return 0;
        }
        catch (LibvirtException e)
        {
            Console.Error.WriteLine($"bfmig-lab-call: {e.Message}");
            return 1;
        }
    }
}
