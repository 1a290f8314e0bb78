using BFMig.Daemon.Tests.Infrastructure;
using BFMig.Native.Libvirt;

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
}
