using BFMig.Daemon.Checkpoints;
using BFMig.Daemon.Tests.Infrastructure;
using BFMig.Native.Libvirt;

namespace BFMig.Daemon.Tests;

/// <summary>
/// Issue 17, point 1, through a real daemon: a guest whose disk BFMig did not carry (shared
/// storage, or a migration that bypassed BFMig) leaves its image untouched on departure. Before
/// the fix the daemon ran <c>qemu-img bitmap --remove</c> on every qcow2 disk of a departed
/// guest (stale in-use bitmaps and BFMig's own), i.e. it wrote the image the guest now runs from.
/// </summary>
public sealed class SharedStorageTests
{
    [Fact]
    public async Task A_departure_that_BFMig_did_not_carry_leaves_the_image_and_its_bitmaps_alone()
    {
        if (!File.Exists("/usr/bin/qemu-img"))
        {
            Assert.False(string.Equals(Environment.GetEnvironmentVariable("CI"), "true", StringComparison.OrdinalIgnoreCase), "qemu-img is required (CI=true)");
            return;
        }
        using var bus = new PrivateBus();
        await using var host = DaemonHost.Start(bus, DaemonHost.Ini("hosta", "hostb", 9));
        var image = Path.Combine(host.Root, "shared.qcow2");
        Assert.Equal(0, Tools.Run("qemu-img", "create", "-q", "-f", "qcow2", image, "4M").ExitCode);
        // A bitmap the old departure cleanup removed (BFMig's own prefix) and a user's persistent one.
        Assert.Equal(0, Tools.Run("qemu-img", "bitmap", "--add", image, CheckpointKeeper.OwnPrefix + "old").ExitCode);
        Assert.Equal(0, Tools.Run("qemu-img", "bitmap", "--add", image, "backup-0").ExitCode);
        var before = (File.GetLastWriteTimeUtc(image), Convert.ToHexString(System.Security.Cryptography.SHA256.HashData(File.ReadAllBytes(image))));

        var uuid = Guid.NewGuid();
        var xml = $"""
            <domain type='test'>
              <name>shared-{uuid:N}</name>
              <uuid>{uuid:D}</uuid>
              <memory unit='MiB'>64</memory>
              <os><type>hvm</type></os>
              <devices>
                <disk type='file' device='disk'>
                  <driver name='qemu' type='qcow2'/>
                  <source file='{image}'/>
                  <target dev='vda' bus='virtio'/>
                </disk>
              </devices>
            </domain>
            """;
        using var libvirt = LibvirtConnection.Open("test:///default");
        using var domain = libvirt.DefineDomain(xml);
        try
        {
            // The daemon knows the guest's disks (as from the hook or a lifecycle event), then libvirt
            // reports the departure, with no BFMig stream: a stock migration of a guest on shared storage.
            host.Daemon.HookEvent(domain.Name, "migrate", "begin", "-", xml);
            host.Daemon.OnEvent(new LibvirtLifecycleDomainEvent(domain.Name, uuid.ToString("D"), LibvirtLifecycleEvent.Stopped, 3));
            var tripPath = Path.Combine(host.Options.StateDirectory, uuid.ToString("D"), "trip.json");
            await Tools.UntilAsync(() => File.Exists(tripPath), "the departure's trip record");
            // The old cleanup ran within a second of the event; give anything queued time to act.
            await Task.Delay(3000);
            await host.Daemon.FlushStateAsync();

            Assert.Contains("\"path\":\"bypassed\"", File.ReadAllText(tripPath), StringComparison.Ordinal);
            var bitmaps = await new ImageBitmaps().ListAsync(image, default);
            Assert.Equal(["backup-0", CheckpointKeeper.OwnPrefix + "old"], bitmaps.Select(b => b.Name).Order(StringComparer.Ordinal));
            Assert.Equal(before, (File.GetLastWriteTimeUtc(image), Convert.ToHexString(System.Security.Cryptography.SHA256.HashData(File.ReadAllBytes(image)))));
            Assert.Contains("never opened, sealed or retained", host.Log, StringComparison.Ordinal);
            Assert.DoesNotContain("stale bitmaps removed", host.Log, StringComparison.Ordinal);
        }
        finally
        {
            domain.Undefine();
        }
    }
}
