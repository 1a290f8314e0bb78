using System.Net.Sockets;
using BFMig.Daemon.Tests.Infrastructure;
using Xunit.Abstractions;

namespace BFMig.Daemon.Tests;

/// <summary>
/// Explicit-mode sockets belong to a guest's name, and a name passes from guest to guest (the
/// lab defines a new lab-guest for every scenario; an operator re-creates a guest). A real bfmigd
/// on libvirt's test driver, its sockets driven directly where libvirt's events cannot be.
/// </summary>
public sealed class MigrationSocketsTests(ITestOutputHelper output)
{
    private const string TestGuestUuid = "6695eb01-f6a4-8304-79aa-97f2502e193f";

    /// <summary>
    /// A later guest of a name takes the sockets over, and the earlier guest's go first: removing
    /// the earlier guest afterwards (its Stopped event handled late) leaves the later guest's in place.
    /// </summary>
    [Fact]
    public async Task Closing_an_earlier_guests_sockets_leaves_those_of_the_later_guest_of_the_same_name()
    {
        using var bus = new PrivateBus();
        await using var host = DaemonHost.Start(bus, DaemonHost.Ini("hosta", "hostb", 9));
        var sockets = host.Daemon.Sockets!;
        host.ActAsQemuOf("g");
        var (earlier, later) = (Guid.NewGuid(), Guid.NewGuid());
        var path = sockets.SocketPath("hostb", "g", BFMig.Transfer.Wire.StreamKind.Mig);

        Assert.True(sockets.Ensure(earlier, "g"));
        Assert.True(sockets.Ensure(later, "g"));
        Assert.DoesNotContain(sockets.Guests, g => g.Uuid == earlier);
        Assert.Contains(sockets.Guests, g => g.Uuid == later && g.Name == "g");

        sockets.Remove(earlier);
        Assert.True(File.Exists(path), $"{path} went with the earlier guest's sockets");
        // Accepted and handed on as the later guest's stream (libvirt knows no "g": nothing to correct).
        await StreamAsync(path, () => Departing(host, later), "the later guest's departure to start");

        sockets.Remove(later);
        Assert.False(File.Exists(path), $"{path} outlived the guest whose socket it was");
        output.WriteLine(host.Log);
    }

    /// <summary>
    /// Events libvirt never delivered on a connection that stayed up (a guest's Stopped, another's
    /// Started): the periodic audit finds the sockets out of step with the running guests, says so
    /// and reconciles, without waiting for a stream or a reconnect.
    /// </summary>
    [Fact]
    public async Task The_audit_puts_sockets_back_in_step_with_the_running_guests_after_missed_events()
    {
        using var bus = new PrivateBus();
        await using var host = DaemonHost.Start(bus, DaemonHost.Ini("hosta", "hostb", 9), guestAudit: (TimeSpan.FromSeconds(1), TimeSpan.FromSeconds(2)));
        var sockets = host.Daemon.Sockets!;
        var (test, ghost) = (Guid.Parse(TestGuestUuid), Guid.NewGuid());
        Assert.True(sockets.Ensure(ghost, "ghost"));
        sockets.Remove(test);
        Assert.Equal([(ghost, "ghost")], sockets.Guests);

        await Tools.UntilAsync(() => sockets.Guests.SequenceEqual([(test, "test")]), "the audit to reconcile the sockets", 20);
        Assert.Contains("running without sockets: test; sockets without a running guest: ghost; corrected", host.Log, StringComparison.Ordinal);
        Assert.True(File.Exists(sockets.SocketPath("hostb", "test", BFMig.Transfer.Wire.StreamKind.Mig)));
        Assert.False(File.Exists(sockets.SocketPath("hostb", "ghost", BFMig.Transfer.Wire.StreamKind.Mig)));

        // In step: later audits say nothing more.
        await Task.Delay(TimeSpan.FromSeconds(11));
        Assert.Equal(1, Count(host.Log, "out of step"));
        output.WriteLine(host.Log);
    }

    /// <summary>
    /// Sockets still set up for an earlier guest of the name (libvirt's events for the change
    /// missed): the stream that arrives there is the guest libvirt now names so, and its departure
    /// is recorded for that guest, not for the earlier one, whose identity the peer would refuse.
    /// The sockets pass to that guest as they are (libvirt connects a trip's disk streams and its
    /// memory stream one after the other), so the next stream is the current guest's too.
    /// </summary>
    [Fact]
    public async Task A_stream_on_sockets_set_up_for_an_earlier_guest_of_the_name_is_the_current_guests()
    {
        using var bus = new PrivateBus();
        await using var host = DaemonHost.Start(bus, DaemonHost.Ini("hosta", "hostb", 9));
        var sockets = host.Daemon.Sockets!;
        var (current, stale) = (Guid.Parse(TestGuestUuid), Guid.NewGuid());
        Assert.True(sockets.Ensure(stale, "test"));
        Assert.Equal([(stale, "test")], sockets.Guests);

        var mig = sockets.SocketPath("hostb", "test", BFMig.Transfer.Wire.StreamKind.Mig);
        var inode = Inode(mig);
        await StreamAsync(mig, () => Departing(host, current), "the departure recorded for the guest libvirt names test");

        Assert.Contains($"set up for guest {stale:D}, libvirt now names {current:D}", host.Log, StringComparison.Ordinal);
        Assert.Equal([(current, "test")], sockets.Guests);
        Assert.Equal(inode, Inode(mig));

        // The trip's next stream, on the other socket of the name: the current guest's without a second correction.
        await StreamAsync(sockets.SocketPath("hostb", "test", BFMig.Transfer.Wire.StreamKind.Nbd),
            () => Count(host.Log, "send nbd of guest test") > 0, "the disk stream's helper to start");
        Assert.Equal(1, Count(host.Log, $"set up for guest {stale:D}"));
        Assert.Null(host.Daemon.Store.ReadLocation(stale).Record);
        output.WriteLine(host.Log);
    }

    /// <summary>
    /// A guest whose name reads as another guest's UUID: asking libvirt for the name must not
    /// answer with that other guest, whose identity its streams would then travel under.
    /// </summary>
    [Fact]
    public async Task A_guest_named_like_another_guests_uuid_keeps_its_own_streams()
    {
        using var bus = new PrivateBus();
        await using var host = DaemonHost.Start(bus, DaemonHost.Ini("hosta", "hostb", 9));
        var sockets = host.Daemon.Sockets!;
        var (other, own) = (Guid.Parse(TestGuestUuid), Guid.NewGuid());
        var name = TestGuestUuid;
        host.ActAsQemuOf(name);
        Assert.True(sockets.Ensure(own, name));

        await StreamAsync(sockets.SocketPath("hostb", name, BFMig.Transfer.Wire.StreamKind.Mig), () => Departing(host, own),
            "the departure recorded for the guest the sockets were set up for");

        Assert.Null(host.Daemon.Store.ReadLocation(other).Record);
        Assert.Contains((own, name), sockets.Guests);
        Assert.Contains((other, "test"), sockets.Guests);
        Assert.DoesNotContain("libvirt now names", host.Log, StringComparison.Ordinal);
    }

    /// <summary>
    /// A guest's socket whose accept loop ended (an error of the listening socket itself, event
    /// 36) no longer counts as serving the guest, and the audit sets it up again: QEMU's next
    /// stream is served. Before, the file stayed, Ensure answered "already set up", and every
    /// migration of the guest hung on a socket nobody accepted on.
    /// </summary>
    [Fact]
    public async Task A_socket_that_stopped_accepting_is_set_up_again_by_the_audit()
    {
        using var bus = new PrivateBus();
        await using var host = DaemonHost.Start(bus, DaemonHost.Ini("hosta", "hostb", 9), guestAudit: (TimeSpan.FromSeconds(1), TimeSpan.FromSeconds(2)));
        var sockets = host.Daemon.Sockets!;
        var test = Guid.Parse(TestGuestUuid);
        await Tools.UntilAsync(() => sockets.Serving.SequenceEqual([(test, "test")]), "the running guest's sockets", 20);
        var path = sockets.SocketPath("hostb", "test", BFMig.Transfer.Wire.StreamKind.Mig);

        // The loops' end on an error of the socket itself is AcceptLoopTests'; here they just end.
        sockets.EndAcceptingForTest(test);
        await Tools.UntilAsync(() => sockets.Serving.Count == 0, "the guest's accept loops to end", 10);
        Assert.True(File.Exists(path));
        Assert.Contains((test, "test"), sockets.Guests);

        await Tools.UntilAsync(() => sockets.Serving.SequenceEqual([(test, "test")]), "the audit to set the sockets up again", 20);
        Assert.Contains("running without sockets: test", host.Log, StringComparison.Ordinal);
        host.ActAsQemuOf("test");
        await StreamAsync(path, () => Departing(host, test), "the departure on the socket set up again");
        output.WriteLine(host.Log);
    }

    /// <summary>Connects to <paramref name="path"/> as the guest's QEMU would and holds the connection until <paramref name="handled"/>.</summary>
    private static async Task StreamAsync(string path, Func<bool> handled, string what)
    {
        using var qemu = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        await qemu.ConnectAsync(new UnixDomainSocketEndPoint(path));
        await Tools.UntilAsync(handled, what);
    }

    private static bool Departing(DaemonHost host, Guid uuid) => host.Daemon.Store.ReadLocation(uuid).Record is { Pending: PendingTrip.Departing };

    private static ulong Inode(string path) => BFMig.Native.Linux.DeviceNode.LStat(path)?.Inode ?? 0;

    private static int Count(string text, string what) => text.Split(what).Length - 1;
}
