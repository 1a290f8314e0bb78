using BFMig.Native.Libvirt;

namespace BFMig.Lab.Calls;

/// <summary>
/// The migration calls of the tools BFMig serves, made exactly as those tools make them, through
/// BFMig's own libvirt bindings. Each runs on the source host against <c>qemu:///system</c>
/// (<c>--source-uri</c>) and exits 0 when libvirt reports success, 1 with its error, 2 on bad usage.
/// <list type="bullet">
/// <item><c>nova --guest NAME --dest-uri URI --migrate-uri URI [--disk TARGET]... [--auto-converge]</c>:
/// OpenStack Nova's live block migration (Nova 26.x, <c>nova/virt/libvirt/guest.py</c> migrate):
/// virDomainMigrateToURI3 to the destination's libvirt with <c>migrate_uri</c> (Nova builds
/// <c>tcp://DEST</c> itself), <c>migrate_disks</c>, <c>destination_xml</c> = <c>persistent_xml</c> =
/// the migratable XML, <c>bandwidth</c> = 0, and LIVE | PEER2PEER | UNDEFINE_SOURCE | PERSIST_DEST |
/// NON_SHARED_INC (+ AUTO_CONVERGE).</item>
/// <item><c>virt-manager --guest NAME --dest-uri URI --uri URI|none</c>: virt-manager's Migrate
/// dialog (virtManager/object/domain.py <c>migrate()</c>): <c>dom.migrate(destconn, LIVE |
/// PERSIST_DEST | UNDEFINE_SOURCE, None, uri, 0)</c>, a managed, non-peer-to-peer migration this
/// process drives over two connections; <c>uri</c> is the dialog's Address (<c>tcp://DEST</c>) or
/// none (the destination's libvirt picks its address, qemu.conf <c>migration_host</c>). It never
/// copies storage: memory only.</item>
/// </list>
/// </summary>
internal static class Program
{
    private const string Usage = """
        usage: bfmig-lab-call nova --guest NAME --dest-uri URI --migrate-uri URI [--disk TARGET]... [--auto-converge] [--source-uri URI]
               bfmig-lab-call virt-manager --guest NAME --dest-uri URI --uri URI|none [--source-uri URI]
        """;

    private static int Main(string[] args)
    {
        if (args.Length == 0 || args[0] is not ("nova" or "virt-manager"))
        {
            Console.Error.WriteLine(Usage);
            return 2;
        }
        string? guest = null, destUri = null, migrateUri = null, uri = null, sourceUri = "qemu:///system";
        var disks = new List<string>();
        bool autoConverge = false;
        for (int i = 1; i < args.Length; i++)
        {
            string Value() => i + 1 < args.Length ? args[++i] : throw new ArgumentException($"{args[i]} needs a value");
            switch (args[i])
            {
                case "--guest": guest = Value(); break;
                case "--dest-uri": destUri = Value(); break;
                case "--migrate-uri": migrateUri = Value(); break;
                case "--uri": uri = Value(); break;
                case "--source-uri": sourceUri = Value(); break;
                case "--disk": disks.Add(Value()); break;
                case "--auto-converge": autoConverge = true; break;
                default: Console.Error.WriteLine($"bfmig-lab-call: unknown option {args[i]}\n{Usage}"); return 2;
            }
        }
        try
        {
            return args[0] == "nova"
                ? Nova(guest, sourceUri, destUri, migrateUri, disks, autoConverge)
                : VirtManager(guest, sourceUri, destUri, uri);
        }
        catch (LibvirtException e)
        {
            Console.Error.WriteLine($"bfmig-lab-call: {e.Message}");
            return 1;
        }
    }

    private static int Nova(string? guest, string sourceUri, string? destUri, string? migrateUri, List<string> disks, bool autoConverge)
    {
        if (guest is null || destUri is null || migrateUri is null)
        {
            Console.Error.WriteLine("bfmig-lab-call nova: --guest, --dest-uri and --migrate-uri are required");
            return 2;
        }
        var flags = LibvirtMigrateFlags.Live | LibvirtMigrateFlags.PeerToPeer | LibvirtMigrateFlags.UndefineSource
            | LibvirtMigrateFlags.PersistDestination | LibvirtMigrateFlags.NonSharedIncremental;
        if (autoConverge)
        {
            flags |= LibvirtMigrateFlags.AutoConverge;
        }
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

    private static int VirtManager(string? guest, string sourceUri, string? destUri, string? uri)
    {
        if (guest is null || destUri is null || uri is null)
        {
            Console.Error.WriteLine("bfmig-lab-call virt-manager: --guest, --dest-uri and --uri (a URI or none) are required");
            return 2;
        }
        string? migrateUri = uri == "none" ? null : uri;
        const LibvirtMigrateFlags Flags = LibvirtMigrateFlags.Live | LibvirtMigrateFlags.PersistDestination | LibvirtMigrateFlags.UndefineSource;
        using var source = LibvirtConnection.Open(sourceUri);
        using var destination = LibvirtConnection.Open(destUri);
        using var domain = source.LookupDomainByName(guest);
        Console.Error.WriteLine($"bfmig-lab-call: virDomainMigrate({guest}, dconn={destUri}, flags={Flags}, dname=NULL, uri={migrateUri ?? "NULL"}, bandwidth=0)");
        using var arrived = domain.Migrate(destination, Flags, migrateUri);
        Console.Error.WriteLine($"bfmig-lab-call: {arrived.Name} runs on {destUri} (active: {arrived.IsActive})");
        return 0;
    }
}
