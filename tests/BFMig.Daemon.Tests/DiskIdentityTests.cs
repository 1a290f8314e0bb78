using System.Diagnostics;
using BFMig.Daemon.Guests;
using BFMig.Daemon.Transfers;
using BFMig.Tests.Shared.Nbd;
using BFMig.Transfer.Disk;
using BFMig.Transfer.Store;
using BFMig.Transfer;
using Xunit.Abstractions;

namespace BFMig.Daemon.Tests;

/// <summary>
/// How bfmigd names disk images to the transfer helper (from the live domain XML) and when it
/// captures the identity of the image a departing guest left behind.
/// </summary>
public sealed class DiskIdentityTests(ITestOutputHelper output)
{
    // A live domain XML as libvirt 9.0 reports it (aliases and source indexes assigned at start).
    private const string LiveXml = """
        <domain type='qemu' id='3'>
          <name>lab-guest</name>
          <uuid>3f6b1f4e-2a3c-4d5e-8f90-1a2b3c4d5e6f</uuid>
          <devices>
            <disk type='file' device='disk'>
              <driver name='qemu' type='qcow2' discard='unmap'/>
              <source file='/var/lib/libvirt/images/lab-guest.qcow2' index='2'/>
              <backingStore/>
              <target dev='vda' bus='virtio'/>
              <alias name='virtio-disk0'/>
            </disk>
            <disk type='file' device='disk'>
              <driver name='qemu' type='raw'/>
              <source file='/var/lib/libvirt/images/data.img' index='1'/>
              <target dev='vdb' bus='virtio'/>
              <alias name='virtio-disk1'/>
            </disk>
            <disk type='block' device='disk'>
              <driver name='qemu' type='raw'/>
              <source dev='/dev/vg0/lv' index='3'/>
              <target dev='vdc' bus='virtio'/>
              <alias name='virtio-disk2'/>
            </disk>
            <disk type='file' device='cdrom'>
              <driver name='qemu' type='raw'/>
              <source file='/srv/iso/install.iso' index='4'/>
              <target dev='sda' bus='sata'/>
              <alias name='sata0-0-0'/>
            </disk>
          </devices>
        </domain>
        """;

    [Fact]
    public void File_backed_and_block_device_disks_are_named_under_every_export_name_libvirt_may_use()
    {
        var disks = DomainDisks.Parse(LiveXml);
        Assert.Equal(["vda", "vdb", "vdc"], disks.Select(d => d.Target));
        Assert.Equal(["drive-virtio-disk0", "libvirt-2-storage", "libvirt-2-format"], disks[0].ExportNames);
        Assert.Equal(("/var/lib/libvirt/images/lab-guest.qcow2", "qcow2"), (disks[0].Image.Path, disks[0].Image.Format));
        Assert.Equal(("/var/lib/libvirt/images/data.img", "raw"), (disks[1].Image.Path, disks[1].Image.Format));
        // A block device is named too: its receiver re-hashes it (its timestamps prove nothing).
        Assert.Equal(("/dev/vg0/lv", "raw"), (disks[2].Image.Path, disks[2].Image.Format));
        Assert.Equal(["drive-virtio-disk2", "libvirt-3-storage", "libvirt-3-format"], disks[2].ExportNames);
        var args = TransferManager.ImageArguments(disks).ToList();
        Assert.Equal(18, args.Count);
        Assert.Equal(["--image", "drive-virtio-disk0=qcow2:/var/lib/libvirt/images/lab-guest.qcow2"], args.Take(2));
        // No export name is claimed by two disks.
        var names = disks.SelectMany(d => d.ExportNames).ToList();
        Assert.Equal(names.Count, names.Distinct().Count());
    }

    [Fact]
    public void Xml_that_does_not_parse_or_names_no_file_gives_no_disk()
    {
        Assert.Empty(DomainDisks.Parse("<domain><devices><disk type='file'>"));
        Assert.Empty(DomainDisks.Parse("<!DOCTYPE x [<!ENTITY e SYSTEM 'file:///etc/passwd'>]><domain>&e;</domain>"));
        Assert.Empty(DomainDisks.Parse("<domain><devices><disk type='file' device='disk'><driver type='qcow2'/><source file='relative.qcow2'/><alias name='a'/></disk></devices></domain>"));
        Assert.Empty(DomainDisks.Parse("<domain><devices><disk type='file' device='disk'><driver type='qcow2'/><source file='/x.qcow2'/></disk></devices></domain>"));
    }

    private sealed class Recorder
    {
        public List<Departure> Departures { get; } = [];

        public void Departed(Departure d) => Departures.Add(d);
    }

    private sealed class Clock(DateTimeOffset now) : TimeProvider
    {
        public DateTimeOffset Now { get; set; } = now;

        public override DateTimeOffset GetUtcNow() => Now;
    }

    private static IReadOnlyList<TransferOutcome> Trip(Guid guest, string map) =>
        [new TransferOutcome("vm", guest, "hostB", "disk", TransferDirection.Send, 0, null,
            new BFMig.Transfer.TransferStats { Export = "drive-virtio-disk0", Committed = true, DiskMap = map })];

    [Fact]
    public void A_departure_joins_the_trip_and_the_source_stop_in_either_order()
    {
        var guest = Guid.NewGuid();
        var r = new Recorder();
        var clock = new Clock(DateTimeOffset.Parse("2026-11-23T12:00:00Z", System.Globalization.CultureInfo.InvariantCulture));
        var join = new DepartureJoin(r.Departed, clock);

        join.StreamStarted(guest);
        join.TripEnded(guest, "vm", Trip(guest, "/s/a.map"));
        Assert.Empty(r.Departures);
        join.SourceStopped(guest, "vm");
        Assert.Single(r.Departures);
        Assert.Equal("/s/a.map", r.Departures[0].Trip![0].Stats!.DiskMap);

        // The other order: libvirt's stop event before the helper's end is read.
        join.StreamStarted(guest);
        join.SourceStopped(guest, "vm");
        Assert.Single(r.Departures);
        join.TripEnded(guest, "vm", Trip(guest, "/s/b.map"));
        Assert.Equal(2, r.Departures.Count);
        Assert.Equal("/s/b.map", r.Departures[1].Trip![0].Stats!.DiskMap);

        // A migration that failed after the disk was confirmed: the guest runs here again, and a
        // later stock migration's stop is a bypass, never that trip's departure.
        join.StreamStarted(guest);
        join.TripEnded(guest, "vm", Trip(guest, "/s/c.map"));
        join.GuestRunning(guest);
        join.SourceStopped(guest, "vm");
        Assert.Equal(3, r.Departures.Count);
        Assert.Null(r.Departures[2].Trip);

        // A stop with no BFMig stream is a bypass at once; a trip ending long after it does not belong to it.
        join.GuestRunning(guest);
        join.SourceStopped(guest, "vm");
        Assert.Equal(4, r.Departures.Count);
        Assert.Null(r.Departures[3].Trip);
        clock.Now += DepartureJoin.MaxGap + TimeSpan.FromSeconds(1);
        join.TripEnded(guest, "vm", Trip(guest, "/s/d.map"));
        Assert.Equal(4, r.Departures.Count);
        clock.Now += TimeSpan.FromSeconds(5);
        join.SourceStopped(guest, "vm");
        Assert.Equal(5, r.Departures.Count);
        Assert.Equal("/s/d.map", r.Departures[4].Trip![0].Stats!.DiskMap);

        // A stop while streams still run waits for them, even across the stop.
        join.StreamStarted(guest);
        join.StreamStarted(guest);
        join.SourceStopped(guest, "vm");
        Assert.Equal(5, r.Departures.Count);
        join.TripEnded(guest, "vm", Trip(guest, "/s/e.map"));
        Assert.Equal(6, r.Departures.Count);
        Assert.NotNull(r.Departures[5].Trip);
    }

    [Fact]
    public async Task Sealing_a_real_map_captures_the_image_as_it_is_then_and_a_later_write_breaks_it()
    {
        if (!File.Exists("/usr/bin/qemu-img") || !File.Exists("/usr/bin/qemu-io"))
        {
            Assert.False(string.Equals(Environment.GetEnvironmentVariable("CI"), "true", StringComparison.OrdinalIgnoreCase), "qemu-img and qemu-io are required (CI=true)");
            output.WriteLine("skipped: qemu-utils not installed");
            return;
        }
        var dir = Directory.CreateTempSubdirectory("bfmig-seal-").FullName;
        try
        {
            var image = Path.Combine(dir, "disk.qcow2");
            await Run("qemu-img", "create", "-q", "-f", "qcow2", image, "4M");
            await Run("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 1M", image);
            var map = await DiskBlockMapBuilder.BuildFromImageAsync(image, "qcow2", 65536, DiskHashKey.NewRandom());
            map.Identity = DiskImageIdentity.PendingCapture(image, "qcow2");
            var mapPath = Path.Combine(dir, "drive-virtio-disk0.map");
            map.Save(mapPath);
            Assert.Null(DiskBlockMap.TryLoadValid(mapPath, DiskImageIdentity.Capture(image, "qcow2")));

            Assert.Equal(SealResult.Sealed, DiskBlockMap.SealIdentity(mapPath));
            Assert.NotNull(DiskBlockMap.TryLoadValid(mapPath, DiskImageIdentity.Capture(image, "qcow2")));
            Assert.Equal(SealResult.NotPending, DiskBlockMap.SealIdentity(mapPath));

            await Task.Delay(20);
            await Run("qemu-io", "-f", "qcow2", "-c", "write -P 0x22 0 64k", image);
            Assert.Null(DiskBlockMap.TryLoadValid(mapPath, DiskImageIdentity.Capture(image, "qcow2")));

            DiskBlockMap.MarkInFlux(mapPath);
            Assert.Equal(SealResult.InFlux, DiskBlockMap.SealIdentity(mapPath));
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }

    private static async Task Run(string file, params string[] args)
    {
        var psi = new ProcessStartInfo(file) { RedirectStandardError = true, UseShellExecute = false };
        foreach (var a in args)
            psi.ArgumentList.Add(a);
        using var p = Process.Start(psi)!;
        var err = await p.StandardError.ReadToEndAsync();
        await p.WaitForExitAsync();
        Assert.True(p.ExitCode == 0, $"{file} {string.Join(' ', args)}: {err}");
    }
}
