using System.Text;
using System.Xml;
using BFMig.Daemon.Checkpoints;
using BFMig.Daemon.Guests;
using BFMig.Hooks;

namespace BFMig.Fuzz;

/// <summary>
/// Every reader of a domain XML (the hook's stdin, the daemon's HookEvent argument, libvirt's
/// answers): the hook's UUID lookup, its echo for <c>migrate</c> and its local guard (bus
/// unreachable), the daemon's disk and memory readers, the split-brain guard's key, the XML cache
/// and the checkpoint keeper's readers. Each documents what it does with XML it cannot read:
/// return nothing, or throw <see cref="CheckpointSetException"/> (<see cref="GuestDisk"/>) or
/// <see cref="XmlException"/> (<see cref="GuestMemory"/>, caught by its only caller). Anything else fails.
/// </summary>
internal static class XmlTarget
{
    private const string SeedUuid = "3b7d8c1e-5f2a-4e6b-9c0d-1a2b3c4d5e6f";

    private static readonly string Dir = Path.Combine(Directory.Exists("/dev/shm") ? "/dev/shm" : Path.GetTempPath(), "bfmig-fuzz-xml-" + Environment.ProcessId);

    public static List<byte[]> Corpus()
    {
        // The lab's guest as lab/lib/guest.sh defines it, then as libvirt shows it running, then on a network disk.
        string script = File.ReadAllText(Path.Combine(AppContext.BaseDirectory, "Seeds", "guest.sh"));
        int start = script.IndexOf("<domain", StringComparison.Ordinal);
        int end = start < 0 ? -1 : script.IndexOf("</domain>", start, StringComparison.Ordinal) + "</domain>".Length;
        // guest.sh fills in the disk element per storage mode ($disk): the seed uses the file disk.
        const string FileDisk = """
                <disk type='file' device='disk'>
                  <driver name='qemu' type='qcow2' discard='unmap'/>
                  <source file='/var/lib/libvirt/images/$LAB_GUEST.qcow2'/>
                  <target dev='vda' bus='virtio'/>
                </disk>
            """;
        if (start < 0 || end < start)
            throw new InvalidOperationException("lab/lib/guest.sh has no <domain>...</domain> template any more: update the xml seeds");
        string defined = script[start..end].Replace("$disk", FileDisk, StringComparison.Ordinal)
            .Replace("$LAB_GUEST", "bfmig-lab", StringComparison.Ordinal).Replace("$ram_mib", "256", StringComparison.Ordinal);
        string live = defined
            .Replace("<name>bfmig-lab</name>", $"<name>bfmig-lab</name>\n  <uuid>{SeedUuid}</uuid>", StringComparison.Ordinal)
            .Replace("<memory unit='MiB'>256</memory>", "<memory unit='KiB'>262144</memory>\n  <currentMemory unit='KiB'>262144</currentMemory>\n  <maxMemory slots='4' unit='KiB'>1048576</maxMemory>", StringComparison.Ordinal)
            .Replace("<source file='/var/lib/libvirt/images/bfmig-lab.qcow2'/>", "<source file='/var/lib/libvirt/images/bfmig-lab.qcow2' index='1'/>\n      <alias name='virtio-disk0'/>", StringComparison.Ordinal);
        int disk = live.IndexOf("<disk ", StringComparison.Ordinal);
        int diskEnd = live.IndexOf("</disk>", disk, StringComparison.Ordinal) + "</disk>".Length;
        string network = live[..disk] + """
            <disk type='network' device='disk'>
                  <driver name='qemu' type='raw'/>
                  <source protocol='nbd' name='lab-disk' index='2'>
                    <host name='198.18.0.3' port='10809'/>
                  </source>
                  <target dev='vda' bus='virtio'/>
                  <alias name='virtio-disk0'/>
                </disk>
                <disk type='file' device='cdrom'>
                  <target dev='hdc' bus='ide'/>
                </disk>
            """ + live[diskEnd..];
        return [.. new[] { defined, live, network }.Select(Encoding.UTF8.GetBytes)];
    }

    public static void Run(byte[] input, Random r)
    {
        string xml = Encoding.UTF8.GetString(input);
        var budget = Budget.Start(1 << 20, "xml");

        var disks = DomainDisks.Describe(xml);
        foreach (var d in DomainDisks.Parse(xml))
        {
            if (!d.Image.Path.StartsWith('/') || d.ExportNames.Count == 0 || !disks.Any(s => s.File == d.Image))
                throw new InvalidOperationException($"disk {d.Target} named to a helper without an absolute image path or export name");
        }
        if (DomainMemory.MaxBytes(xml) < 0)
            throw new InvalidOperationException("negative domain memory");
        if (SplitBrainGuard.KeyOf("guest", xml).Length == 0)
            throw new InvalidOperationException("empty split-brain key");
        new DomainXmlCache().Remember(xml);
        try
        {
            GuestDisk.FromDomainXml(xml);
        }
        catch (CheckpointSetException)
        {
        }
        try
        {
            GuestMemory.FromDomainXml(xml);
        }
        catch (XmlException)
        {
        }

        string? uuid = Hook.DomainUuid(xml);
        if (uuid is not null && !Guid.TryParse(uuid, out _))
            throw new InvalidOperationException($"hook read uuid '{uuid}'");
        RunHook(xml);
        budget.Check(64L * input.Length);
    }

    // The bus is unreachable, so the hook decides from local state: the guest is recorded away
    // (when the XML names the seed's UUID), and "migrate begin" marks the return trip.
    private static void RunHook(string xml)
    {
        var settings = new HookSettings(Path.Combine(Dir, "state"), Path.Combine(Dir, "run"), "unix:path=" + Path.Combine(Dir, "no-bus"), TimeSpan.FromSeconds(2));
        string record = Path.Combine(settings.StateDirectory, SeedUuid, "mem", "state.json");
        if (!File.Exists(record))
        {
            Directory.CreateDirectory(Path.GetDirectoryName(record)!);
            File.WriteAllText(record, """{"location":"away","peer":"hostb","since":"2026-12-04T10:00:00Z"}""");
        }
        var stdout = new StringWriter();
        int rc = Hook.Run(["guest", "migrate", "begin", "-"], new StringReader(xml), stdout, TextWriter.Null, settings);
        if (rc != 0 || stdout.ToString() != xml)
            throw new InvalidOperationException($"hook migrate: exit {rc}, echoed {stdout.ToString().Length} of {xml.Length} characters");
        rc = Hook.Run(["guest", "prepare", "begin", "-"], new StringReader(xml), TextWriter.Null, TextWriter.Null, settings);
        if (rc is not (0 or 1))
            throw new InvalidOperationException($"hook prepare: exit {rc}");
    }

    /// <summary>Removes the scratch directory (end of a mutation run).</summary>
    public static void Close()
    {
        if (Directory.Exists(Dir))
            Directory.Delete(Dir, recursive: true);
    }
}
