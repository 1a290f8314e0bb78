using BFMig.Daemon.Transfers;
using BFMig.Transfer.Disk;
using BFMig.Transfer.Wire;

namespace BFMig.Daemon.Guests;

/// <summary>What BFMig may do with one disk of a guest that just left this host.</summary>
/// <param name="Disk">The disk.</param>
/// <param name="Carried">
/// True only when this trip's NBD stream for the disk went through BFMig and ended well: the
/// image here is then the copy the guest left behind, private to this host, and BFMig may clean,
/// seal and retain it. False: the image is (or may be) the one the guest now runs from elsewhere.
/// </param>
/// <param name="Why">One line for the journal and <c>bfmig list</c>.</param>
public sealed record DiskVerdict(DomainDiskSource Disk, bool Carried, string Why);

/// <summary>
/// The one rule for touching a departed guest's disk images: BFMig touches, seals or retains an
/// image only if it carried that disk's contents on this trip (an NBD stream for one of the
/// disk's export names went through a sending helper and ended with exit 0). Everything else is
/// shared storage as far as BFMig knows (NFS, Ceph RBD, iSCSI, any <c>type='network'</c> disk, or
/// a disk libvirt copied around BFMig): never opened for writing, nothing retained for it. A
/// network disk is always shared; the trip that carried none of the disks was memory only.
/// </summary>
public static class ImageCustody
{
    /// <summary>
    /// Decides for each disk of the departed guest. <paramref name="trip"/> is the outgoing
    /// trip's stream outcomes (null: no stream went through BFMig, the migration bypassed it).
    /// A trip in which any stream failed carried nothing: the migration it belonged to failed.
    /// </summary>
    public static IReadOnlyList<DiskVerdict> Decide(IReadOnlyList<DomainDiskSource> disks, IReadOnlyList<TransferOutcome>? trip, bool postCopy = false)
    {
        var carried = CarriedExports(trip, postCopy);
        return [.. disks.Select(d => Decide(d, carried, trip is null))];
    }

    private static DiskVerdict Decide(DomainDiskSource disk, IReadOnlySet<string> carried, bool bypassed)
    {
        if (disk.SourceType == "network")
            return new DiskVerdict(disk, false, $"{disk.Target}: network disk ({(disk.Protocol.Length > 0 ? disk.Protocol : "unknown protocol")}), shared storage: memory only, never touched");
        if (disk.File is not null && disk.ExportNames.Any(carried.Contains))
            return new DiskVerdict(disk, true, $"{disk.Target}: {disk.File.Path} carried through BFMig on this trip");
        var what = disk.File?.Path ?? $"{disk.SourceType} disk";
        return new DiskVerdict(disk, false, bypassed
            ? $"{disk.Target}: {what} not carried (the migration bypassed BFMig): left untouched"
            : $"{disk.Target}: {what} not copied through BFMig on this trip (shared storage): left untouched");
    }

    /// <summary>
    /// The export names whose NBD stream a successful outgoing trip carried. After a switch to
    /// post-copy (<paramref name="postCopy"/>) the mirror had completed and the guest ran at the
    /// destination, so a memory stream that failed afterwards does not undo what the disk
    /// streams carried; a failed disk stream still does.
    /// </summary>
    public static IReadOnlySet<string> CarriedExports(IReadOnlyList<TransferOutcome>? trip, bool postCopy = false)
    {
        var exports = new HashSet<string>(StringComparer.Ordinal);
        var nbd = TransferManager.StreamName(BFMig.Transfer.Wire.StreamKind.Nbd);
        if (trip is null || trip.Count == 0 || trip.Any(o => (!o.Ok && !(postCopy && o.Stream != nbd)) || o.Direction != TransferDirection.Send))
            return exports;
        foreach (var o in trip)
        {
            if (o.Stream == nbd && o.Stats?.Export is { Length: > 0 } export)
                exports.Add(export);
        }
        return exports;
    }

    /// <summary>The images BFMig may touch (clean, seal): those of the carried disks.</summary>
    public static IReadOnlyList<DiskImageSpec> CarriedImages(IReadOnlyList<DiskVerdict> verdicts) =>
        [.. verdicts.Where(v => v.Carried).Select(v => v.Disk.File!)];

    /// <summary>
    /// The disk maps of this trip whose identity may be captured: confirmed by both hosts and
    /// describing a carried disk (a map of anything else would name an image BFMig must not trust).
    /// </summary>
    public static IReadOnlyList<string> SealableMaps(IReadOnlyList<DiskVerdict> verdicts, IReadOnlyList<TransferOutcome>? trip, bool postCopy = false)
    {
        var carried = CarriedExports(trip, postCopy);
        var exports = verdicts.Where(v => v.Carried).SelectMany(v => v.Disk.ExportNames).ToHashSet(StringComparer.Ordinal);
        return trip is null ? [] : [.. trip
            .Where(o => o.Stats is { Committed: true, DiskMap: not null, Export: { } e } && carried.Contains(e) && exports.Contains(e))
            .Select(o => o.Stats!.DiskMap!)];
    }
}
