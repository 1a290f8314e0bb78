using BFMig.Transfer.Disk.Nbd;

namespace BFMig.Transfer.Disk;

/// <summary>
/// Receives the block map of a target image after one trip: what every block of the receiver's
/// image holds once the disk stream ended (hash, or unknown when a write was partial, failed,
/// still in flight, or a TRIM made its content unspecified). The NBD sender filter and the
/// receiver's <see cref="BFMig.Transfer.Disk.Nbd.NbdStreamObserver"/> report the same map for the
/// same stream, so both hosts can compare digests at the end of a trip.
/// </summary>
public interface IDiskRecorder
{
    /// <summary>Starts a report for an export of <paramref name="imageSize"/> bytes; every block not reported after this is unknown.</summary>
    void BeginTrip(ulong imageSize, int blockSize, DiskHashKey hashKey);

    /// <summary>Block <paramref name="blockIndex"/> now holds content with <paramref name="hash"/>; null means unknown.</summary>
    void RecordBlock(long blockIndex, UInt128? hash);

    /// <summary>
    /// Ends the report. <paramref name="clean"/> is true only when the client disconnected
    /// properly (NBD_CMD_DISC after every request was answered); otherwise the caller should
    /// not trust the map for elision and the image should be treated as in flux.
    /// </summary>
    void EndTrip(bool clean);
}
