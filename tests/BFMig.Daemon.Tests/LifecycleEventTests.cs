using BFMig.Daemon.Tests.Infrastructure;
using BFMig.Native.Libvirt;
using BFMig.Transfer.Disk;

namespace BFMig.Daemon.Tests;

/// <summary>libvirt's lifecycle events, replayed into a real bfmigd, as they move the guest's location record.</summary>
public sealed class LifecycleEventTests
{
    private const string TestGuestUuid = "6695eb01-f6a4-8304-79aa-97f2502e193f";

    [Fact]
    public async Task A_post_copy_resume_on_the_destination_is_the_arrival_and_a_later_stop_does_not_roll_it_back()
    {
        using var bus = new PrivateBus();
        await using var host = DaemonHost.Start(bus, DaemonHost.Ini("hostb", "hosta", 9));
        var uuid = Guid.Parse(TestGuestUuid);
        host.Daemon.Store.WriteLocation(uuid, new LocationRecord(GuestPlace.Away, "hosta", DateTimeOffset.UtcNow.AddHours(-1), PendingTrip.Arriving, "hosta"));

        // Resumed/PostCopy is the last word libvirt says on the destination: no Resumed/Migrated follows.
        host.Daemon.OnEvent(new LibvirtLifecycleDomainEvent("test", TestGuestUuid, LibvirtLifecycleEvent.Resumed, (int)LibvirtResumedDetail.PostCopy));
        await Tools.UntilAsync(() => host.Daemon.Store.ReadLocation(uuid).Record is { Place: GuestPlace.Here, Pending: PendingTrip.None, Peer: "hosta" },
            "the post-copy arrival recorded here");

        host.Daemon.OnEvent(new LibvirtLifecycleDomainEvent("test", TestGuestUuid, LibvirtLifecycleEvent.Stopped, (int)LibvirtStoppedDetail.Shutdown));
        await Task.Delay(300);
        Assert.Equal(GuestPlace.Here, host.Daemon.Store.ReadLocation(uuid).Record?.Place);
    }

    /// <summary>
    /// An incoming trip failed (here: Stopped/Failed while the guest is recorded away): the
    /// receiving helper left its maps naming their images with the identity pending and a journal
    /// of the blocks it wrote. Once the incoming QEMU stopped, bfmigd captures the identities, so
    /// the retry may use the maps outside the journal; a map wholly in doubt stays as it is.
    /// </summary>
    [Fact]
    public async Task A_failed_arrival_captures_the_identity_of_the_images_its_trip_wrote_under_a_journal()
    {
        using var bus = new PrivateBus();
        await using var host = DaemonHost.Start(bus, DaemonHost.Ini("hostb", "hosta", 9));
        var uuid = Guid.Parse(TestGuestUuid);
        host.Daemon.Store.WriteLocation(uuid, new LocationRecord(GuestPlace.Away, "hosta", DateTimeOffset.UtcNow.AddHours(-1), PendingTrip.Arriving, "hosta"));
        var disk = Path.Combine(host.Daemon.Store.GuestDirectory(uuid), "disk");
        Directory.CreateDirectory(disk);
        // A map an earlier trip left pending: it describes the image as it was then.
        var older = Path.Combine(disk, "vdc.map");
        var olderImage = Path.Combine(disk, "vdc.img");
        File.WriteAllBytes(olderImage, new byte[1 << 20]);
        new DiskBlockMap(1 << 20, DiskMapStore.BlockSize, DiskHashKey.NewRandom(), DiskImageIdentity.PendingCapture(olderImage, "raw")).Save(older);
        await Task.Delay(600);
        host.Daemon.StreamStarting(uuid, "test", "hosta", BFMig.Daemon.Transfers.TransferDirection.Receive, BFMig.Transfer.Wire.StreamKind.Nbd, BFMig.Daemon.Guests.TripRoute.Explicit);
        string MapWithPendingIdentity(string name)
        {
            var image = Path.Combine(disk, name + ".img");
            File.WriteAllBytes(image, new byte[1 << 20]);
            var map = new DiskBlockMap(1 << 20, DiskMapStore.BlockSize, DiskHashKey.NewRandom(), DiskImageIdentity.PendingCapture(image, "raw"));
            var path = Path.Combine(disk, name + ".map");
            map.Save(path);
            return path;
        }
        var journaled = MapWithPendingIdentity("vda");
        using (var journal = DiskDoubtJournal.Begin(journaled, DiskMapStore.BlockSize, DiskDoubt.None))
        {
            journal.Touching(0, 65536);
            journal.Settle();
        }
        var invalidated = MapWithPendingIdentity("vdb");
        DiskBlockMap.MarkInFlux(invalidated);

        host.Daemon.OnEvent(new LibvirtLifecycleDomainEvent("test", TestGuestUuid, LibvirtLifecycleEvent.Stopped, (int)LibvirtStoppedDetail.Failed));
        await Tools.UntilAsync(() => DiskBlockMap.Load(journaled).Identity is { IsPending: false }, "the identity of the journaled map's image captured");
        Assert.Equal(GuestPlace.Away, host.Daemon.Store.ReadLocation(uuid).Record?.Place);
        Assert.True(DiskBlockMap.Load(invalidated).Identity!.IsPending);
        Assert.True(DiskBlockMap.Load(older).Identity!.IsPending);
        // The journal stays: the blocks the trip wrote remain in doubt.
        Assert.Equal([new BlockRange(0, 1)], DiskDoubtJournal.Read(journaled).Ranges);
    }

    [Fact]
    public async Task A_guest_that_stops_here_while_here_has_no_map_sealed()
    {
        using var bus = new PrivateBus();
        await using var host = DaemonHost.Start(bus, DaemonHost.Ini("hostb", "hosta", 9));
        var uuid = Guid.Parse(TestGuestUuid);
        host.Daemon.Store.WriteLocation(uuid, new LocationRecord(GuestPlace.Here, "hosta", DateTimeOffset.UtcNow.AddHours(-1)));
        var disk = Path.Combine(host.Daemon.Store.GuestDirectory(uuid), "disk");
        Directory.CreateDirectory(disk);
        var image = Path.Combine(disk, "vda.img");
        File.WriteAllBytes(image, new byte[1 << 20]);
        var path = Path.Combine(disk, "vda.map");
        new DiskBlockMap(1 << 20, DiskMapStore.BlockSize, DiskHashKey.NewRandom(), DiskImageIdentity.PendingCapture(image, "raw")).Save(path);

        host.Daemon.OnEvent(new LibvirtLifecycleDomainEvent("test", TestGuestUuid, LibvirtLifecycleEvent.Stopped, (int)LibvirtStoppedDetail.Shutdown));
        await host.Daemon.FlushStateAsync();
        await Task.Delay(300);
        // Its map is the peer view of the other host's image, never a description of this one.
        Assert.True(DiskBlockMap.Load(path).Identity!.IsPending);
    }
}
