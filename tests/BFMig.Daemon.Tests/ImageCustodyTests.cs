using BFMig.Daemon.Guests;
using BFMig.Daemon.Transfers;
using BFMig.Transfer.Wire;
using BFMig.Transfer;

namespace BFMig.Daemon.Tests;

/// <summary>
/// The shared-storage safety rule (issue 17): after a departure BFMig may touch (clean, seal,
/// retain) only an image whose NBD stream it carried on that trip; and how each trip is recorded.
/// </summary>
public sealed class ImageCustodyTests
{
    // A live domain XML with one file disk, one network disk (Ceph RBD) and one NBD network disk.
    private const string LiveXml = """
        <domain type='qemu' id='3'>
          <name>vm</name>
          <uuid>3f6b1f4e-2a3c-4d5e-8f90-1a2b3c4d5e6f</uuid>
          <devices>
            <disk type='file' device='disk'>
              <driver name='qemu' type='qcow2'/>
              <source file='/var/lib/libvirt/images/vm.qcow2' index='3'/>
              <target dev='vda' bus='virtio'/>
              <alias name='virtio-disk0'/>
            </disk>
            <disk type='network' device='disk'>
              <driver name='qemu' type='raw'/>
              <source protocol='rbd' name='pool/vm-data' index='2'><host name='198.18.5.1' port='6789'/></source>
              <target dev='vdb' bus='virtio'/>
              <alias name='virtio-disk1'/>
            </disk>
            <disk type='network' device='disk'>
              <driver name='qemu' type='qcow2'/>
              <source protocol='nbd' name='guest' index='1'><host name='198.18.5.1' port='10809'/></source>
              <target dev='vdc' bus='virtio'/>
              <alias name='virtio-disk2'/>
            </disk>
          </devices>
        </domain>
        """;

    private static readonly Guid Guest = Guid.Parse("3f6b1f4e-2a3c-4d5e-8f90-1a2b3c4d5e6f");

    private static TransferOutcome Memory(int exit = 0) =>
        new("vm", Guest, "hostB", "memory", TransferDirection.Send, exit, exit == 0 ? null : "broken", new TransferStats { Kind = "mig", Committed = exit == 0 });

    private static TransferOutcome Disk(string export, int exit = 0) =>
        new("vm", Guest, "hostB", "disk", TransferDirection.Send, exit, exit == 0 ? null : "broken",
            new TransferStats { Kind = "nbd", Export = export, Committed = exit == 0, DiskMap = $"/state/{export}.map" });

    [Fact]
    public void Every_disk_is_described_network_disks_with_their_protocol()
    {
        var disks = DomainDisks.Describe(LiveXml);
        Assert.Equal(["vda", "vdb", "vdc"], disks.Select(d => d.Target));
        Assert.Equal(["file", "network", "network"], disks.Select(d => d.SourceType));
        Assert.Equal(["", "rbd", "nbd"], disks.Select(d => d.Protocol));
        Assert.NotNull(disks[0].File);
        Assert.Null(disks[1].File);
        // Only the file disk is ever named to a helper (--image).
        Assert.Equal(["vda"], DomainDisks.Parse(LiveXml).Select(d => d.Target));
    }

    [Fact]
    public void Only_a_disk_whose_stream_BFMig_carried_may_be_touched()
    {
        var disks = DomainDisks.Describe(LiveXml);
        var verdicts = ImageCustody.Decide(disks, [Memory(), Disk("libvirt-3-format")]);
        Assert.Equal([true, false, false], verdicts.Select(v => v.Carried));
        Assert.Equal(["/var/lib/libvirt/images/vm.qcow2"], ImageCustody.CarriedImages(verdicts).Select(i => i.Path));
        Assert.Equal(["/state/libvirt-3-format.map"], ImageCustody.SealableMaps(verdicts, [Memory(), Disk("libvirt-3-format")]));
        Assert.Contains("network disk (rbd)", verdicts[1].Why, StringComparison.Ordinal);
        Assert.Contains("network disk (nbd)", verdicts[2].Why, StringComparison.Ordinal);
    }

    [Fact]
    public void After_a_switch_to_post_copy_a_failed_memory_stream_leaves_what_the_disk_streams_carried()
    {
        var disks = DomainDisks.Describe(LiveXml);
        TransferOutcome[] trip = [Memory(exit: 1), Disk("drive-virtio-disk0")];
        Assert.Empty(ImageCustody.CarriedImages(ImageCustody.Decide(disks, trip)));
        var postCopy = ImageCustody.Decide(disks, trip, postCopy: true);
        Assert.Equal(["/var/lib/libvirt/images/vm.qcow2"], ImageCustody.CarriedImages(postCopy).Select(i => i.Path));
        Assert.Equal(["/state/drive-virtio-disk0.map"], ImageCustody.SealableMaps(postCopy, trip, postCopy: true));
        // A disk stream that failed carried nothing, post-copy or not.
        TransferOutcome[] diskFailed = [Memory(), Disk("drive-virtio-disk0", exit: 1)];
        Assert.Empty(ImageCustody.CarriedImages(ImageCustody.Decide(disks, diskFailed, postCopy: true)));
    }

    [Fact]
    public void A_memory_only_trip_a_bypass_or_a_failed_trip_touches_no_image()
    {
        var disks = DomainDisks.Describe(LiveXml);
        // Shared storage: libvirt copied no disk, only the memory stream went through BFMig.
        var memoryOnly = ImageCustody.Decide(disks, [Memory()]);
        Assert.All(memoryOnly, v => Assert.False(v.Carried));
        Assert.Empty(ImageCustody.CarriedImages(memoryOnly));
        Assert.Contains("shared storage", memoryOnly[0].Why, StringComparison.Ordinal);
        // No BFMig stream at all.
        var bypass = ImageCustody.Decide(disks, null);
        Assert.Empty(ImageCustody.CarriedImages(bypass));
        Assert.Contains("bypassed", bypass[0].Why, StringComparison.Ordinal);
        Assert.Empty(ImageCustody.SealableMaps(bypass, null));
        // A trip with a failed stream carried nothing (its migration failed).
        var failed = ImageCustody.Decide(disks, [Memory(exit: 1), Disk("drive-virtio-disk0")]);
        Assert.Empty(ImageCustody.CarriedImages(failed));
        Assert.Empty(ImageCustody.SealableMaps(failed, [Memory(exit: 1), Disk("drive-virtio-disk0")]));
        // A stream for an export that names no disk of this guest carries none of its images.
        Assert.Empty(ImageCustody.CarriedImages(ImageCustody.Decide(disks, [Memory(), Disk("drive-virtio-disk9")])));
        // Unknown disks (no cached XML) means nothing is touched, not everything.
        Assert.Empty(ImageCustody.Decide([], [Memory(), Disk("drive-virtio-disk0")]));
        Assert.Empty(ImageCustody.SealableMaps([], [Memory(), Disk("drive-virtio-disk0")]));
    }

    [Fact]
    public void Trips_are_recorded_as_accelerated_shared_storage_or_bypassed_and_kept_across_restarts()
    {
        var dir = Directory.CreateTempSubdirectory("bfmig-trips-").FullName;
        try
        {
            var store = new GuestStateStore(dir);
            var clock = new Ticks();
            var trips = new TripRecorder(store, clock);
            var disks = DomainDisks.Describe(LiveXml);

            trips.StreamStarted(Guest, TransferDirection.Send, StreamKind.Mig, TripRoute.Explicit);
            var memoryOnly = Depart(trips, new Departure(Guest, "vm", [Memory()]), ImageCustody.Decide(disks, [Memory()]), "hostB");
            Assert.Equal((TripRecord.Accelerated, true, "hostB"), (memoryOnly.Path, memoryOnly.MemoryOnly, memoryOnly.Peer));
            Assert.Equal("accelerated, shared storage (memory only)", memoryOnly.Summary);

            var bypass = Depart(trips, new Departure(Guest, "vm", null), ImageCustody.Decide(disks, null), "hostB");
            Assert.Equal(TripRecord.Bypassed, bypass.Path);
            Assert.Contains("no BFMig URI, and transparent mode off or unavailable", bypass.Reason, StringComparison.Ordinal);

            // Transparent mode carried the streams straight to the peer's QEMU: the bypass says why,
            // the memory stream's reason over a disk's, and only for that departure.
            var noTrip = new Departure(Guest, "vm", null);
            var none = ImageCustody.Decide(disks, null);
            trips.StreamCarried(Guest, "disk", "the bfmigd of peer hostB speaks protocol 10, this one 9");
            trips.StreamCarried(Guest, "memory", "every transfer slot is taken");
            trips.StreamCarried(Guest, "disk", "a later disk");
            var carried = Depart(trips, noTrip, none, "hostB");
            Assert.Equal((TripRecord.Bypassed, "transparent mode carried the memory stream at stock cost: every transfer slot is taken"),
                (carried.Path, carried.Reason));
            Assert.Equal(TripRecorder.BypassReason, Depart(trips, noTrip, none, "hostB").Reason);
            // A migration that failed after the pause (the guest resumed here) leaves no reason behind.
            using (trips.StreamCarried(Guest, "memory", "stale"))
                trips.NoDeparture(Guest);
            Assert.Equal(TripRecorder.BypassReason, Depart(trips, noTrip, none, "hostB").Reason);
            // One that failed before it (no event): its carried streams closed long ago.
            trips.StreamCarried(Guest, "memory", "old").Dispose();
            clock.Advance(TripRecorder.CarriedNoteLife + TimeSpan.FromSeconds(1));
            Assert.Equal(TripRecorder.BypassReason, Depart(trips, noTrip, none, "hostB").Reason);
            // A stream that closed as the migration completed still describes it.
            trips.StreamCarried(Guest, "memory", "recent").Dispose();
            clock.Advance(TimeSpan.FromSeconds(5));
            Assert.EndsWith(": recent", Depart(trips, noTrip, none, "hostB").Reason, StringComparison.Ordinal);
            // A stream of a note that is gone closes nothing of the next trip's note.
            var late = trips.StreamCarried(Guest, "memory", "first attempt");
            trips.NoDeparture(Guest);
            trips.StreamCarried(Guest, "memory", "second attempt");
            late.Dispose();
            clock.Advance(TripRecorder.CarriedNoteLife + TimeSpan.FromSeconds(1));
            Assert.EndsWith(": second attempt", Depart(trips, noTrip, none, "hostB").Reason, StringComparison.Ordinal);
            // A retry whose memory stream went through BFMig drops the failed attempt's closed note.
            trips.StreamCarried(Guest, "memory", "failed attempt").Dispose();
            trips.StreamStarted(Guest, TransferDirection.Send, StreamKind.Mig, TripRoute.Transparent);
            Assert.Equal("memory through BFMig", Depart(trips, new Departure(Guest, "vm", [Memory()]), ImageCustody.Decide(disks, [Memory()]), "hostB").Reason.Split("; ")[0]);
            // The memory stream carried (no free slot), the disk through BFMig: not "memory through BFMig".
            trips.StreamCarried(Guest, "memory", "every transfer slot is taken");
            trips.StreamStarted(Guest, TransferDirection.Send, StreamKind.Nbd, TripRoute.Transparent);
            var mixed = Depart(trips, new Departure(Guest, "vm", [Disk("drive-virtio-disk0")]),
                ImageCustody.Decide(disks, [Disk("drive-virtio-disk0")]), "hostB");
            Assert.Equal(TripRecord.AcceleratedTransparent, mixed.Path);
            Assert.StartsWith("transparent mode carried the memory stream at stock cost: every transfer slot is taken; ", mixed.Reason, StringComparison.Ordinal);

            // Transparent mode marks its streams; the departure says so.
            trips.StreamStarted(Guest, TransferDirection.Send, StreamKind.Mig, TripRoute.Transparent);
            trips.StreamStarted(Guest, TransferDirection.Send, StreamKind.Nbd, TripRoute.Transparent);
            var full = Depart(trips, new Departure(Guest, "vm", [Memory(), Disk("drive-virtio-disk0")]),
                ImageCustody.Decide(disks, [Memory(), Disk("drive-virtio-disk0")]), "hostB");
            Assert.Equal((TripRecord.AcceleratedTransparent, false), (full.Path, full.MemoryOnly));

            // Arrivals: only after an incoming migration started here; streams say how.
            Assert.Null(trips.Arrived(Guest, "hostB"));
            trips.IncomingStarted(Guest);
            Assert.Equal(TripRecord.Bypassed, trips.Arrived(Guest, "hostB")!.Path);
            trips.StreamStarted(Guest, TransferDirection.Receive, StreamKind.Mig, TripRoute.Explicit);
            trips.IncomingStarted(Guest); // libvirt's event may come after the first stream
            var arrived = trips.Arrived(Guest, "hostB")!;
            Assert.Equal((TripRecord.Accelerated, true), (arrived.Path, arrived.MemoryOnly));
            // A failed incoming trip (the guest stopped here) leaves nothing for the next arrival.
            trips.IncomingStarted(Guest);
            trips.StreamStarted(Guest, TransferDirection.Receive, StreamKind.Mig, TripRoute.Explicit);
            trips.GuestStopped(Guest);
            Assert.Null(trips.Arrived(Guest, "hostB"));

            var again = new TripRecorder(store, TimeProvider.System).Read(Guest)!;
            Assert.Equal(("arrival", TripRecord.Accelerated, true, "hostB"), (again.Direction, again.Path, again.MemoryOnly, again.Peer));
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }

    // What the daemon does: the carried streams are taken when libvirt reports the departure.
    private static TripRecord Depart(TripRecorder trips, Departure departure, IReadOnlyList<DiskVerdict> verdicts, string? peer) =>
        trips.Departed(departure, verdicts, peer, trips.TakeCarried(departure.Uuid));

    private sealed class Ticks : TimeProvider
    {
        private long _now = 1;

        public override long TimestampFrequency => TimeSpan.TicksPerSecond;

        public override long GetTimestamp() => _now;

        public void Advance(TimeSpan by) => _now += by.Ticks;
    }
}
