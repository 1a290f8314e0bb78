using System.Text.Json.Serialization;

namespace BFMig.Transfer;

/// <summary>Counters of one stream, written as JSON by <c>--stats FILE</c>.</summary>
public sealed class TransferStats
{
    public string Role { get; set; } = "";
    public string Kind { get; set; } = "";
    /// <summary>"store-match" (elision on), "store-full" (stores disagreed: everything sent), "coded-channel" (a multifd channel coded through its main stream's helper), "quiet-channel" (QEMU's post-copy preempt channel, a tunnel with no idle timeout), or "plain" (tunnel).</summary>
    public string Mode { get; set; } = "";
    /// <summary>Bytes read from the local QEMU (sender) or written to it (receiver), forward direction.</summary>
    public long StreamBytes { get; set; }
    /// <summary>Bytes of the reverse direction (return path, NBD replies).</summary>
    public long ReverseBytes { get; set; }
    /// <summary>Bytes read from the local QEMU (sender) or written to it (receiver), before elision; counted as they move.</summary>
    public long LocalBytes { get; set; }
    /// <summary>Kind nbd: the export the NBD client opened.</summary>
    public string? Export { get; set; }
    /// <summary>Receiver: the sender proved who it is (TLS client certificate, or the PSK proof in its auth frame).</summary>
    public bool Authenticated { get; set; }
    /// <summary>Sender, memory: the stream is armed for post-copy now (<see cref="Memory.QemuStreamParser.PostCopyArmed"/>, and QEMU's side still open); live only, in progress reports.</summary>
    [JsonIgnore]
    public bool PostCopyArmed { get; set; }
    public long WireBytesOut { get; set; }
    public long WireBytesIn { get; set; }
    public long PagesElided { get; set; }
    public long PagesReferenced { get; set; }
    public long PagesDelta { get; set; }
    public long PagesFull { get; set; }
    public long ZeroPages { get; set; }
    public long UnknownPages { get; set; }
    public long PassthroughBytes { get; set; }
    /// <summary>Paced memory stream, sender: how often and how long it waited for the destination QEMU to catch up.</summary>
    public int PacedWaits { get; set; }
    /// <inheritdoc cref="PacedWaits"/>
    public double PacedWaitSeconds { get; set; }
    /// <summary>Memory stream, receiver: how often and how long it waited for its QEMU to load what it had been given (<see cref="LocalConnection.WriteGatedAsync"/>).</summary>
    public int LoadWaits { get; set; }
    /// <inheritdoc cref="LoadWaits"/>
    public double LoadWaitSeconds { get; set; }
    /// <summary>Memory stream, receiver: seconds the store's commit took, from the end of its wait (<see cref="CommitWaitSeconds"/>).</summary>
    public double CommitSeconds { get; set; }
    /// <summary>Memory stream, receiver: seconds from the end frame until the commit began, waiting for the guest to run here (<see cref="Memory.MigReceiver.GuestRuns"/>).</summary>
    public double CommitWaitSeconds { get; set; }
    public bool SnapshotComplete { get; set; }
    public string? OpaqueReason { get; set; }
    /// <summary>A multifd channel (sender): what it carried, or where its parser stopped following it.</summary>
    public string? Multifd { get; set; }
    /// <summary>Why this stream ran without a store (e.g. its file system was full), null when it had one or never asked.</summary>
    public string? StoreSkipped { get; set; }
    /// <summary>Kind mig: pages not elided because an interrupted trip left them in doubt on either host (-1: the store kept nothing).</summary>
    public long MemDoubtPages { get; set; }
    /// <summary>Kind mig: why the retained memory store was not used (null when it was, or never asked for).</summary>
    public string? StoreUnused { get; set; }
    /// <summary>Kind mig, mode store-index: pages of the receiver's earlier snapshot its page index described (the trip was coded against them).</summary>
    public long IndexPages { get; set; }
    /// <summary>Kind mig, a trip that did not commit: what it leaves in doubt for the next one.</summary>
    public string? MemDoubtAfter { get; set; }
    public ulong Generation { get; set; }
    public bool Committed { get; set; }
    /// <summary>Kind nbd: the map file this helper saved (committed trips only).</summary>
    public string? DiskMap { get; set; }
    /// <summary>Kind nbd, receiver: why the retained map of the export was not used (null when it was, or there was none).</summary>
    public string? DiskMapRefused { get; set; }
    /// <summary>Receiver: what re-hashing the retained image proved and cost, when the identity could not prove it (<see cref="Disk.DiskRehash"/>).</summary>
    public string? DiskRehash { get; set; }
    /// <summary>Receiver: seconds the re-hash took (0: none).</summary>
    public double DiskRehashSeconds { get; set; }
    /// <summary>Receiver: bytes the re-hash read.</summary>
    public long DiskRehashBytes { get; set; }
    /// <summary>Kind nbd: why no retained map was used (no map yet, in doubt, refused, differs), null when one was.</summary>
    public string? DiskMapUnused { get; set; }
    /// <summary>Kind nbd: blocks not elided because an interrupted trip left them in doubt (when a map was used).</summary>
    public long DiskDoubtBlocks { get; set; }
    /// <summary>Kind nbd, a trip that did not commit: what its journal leaves in doubt for the next one.</summary>
    public string? DiskDoubtAfter { get; set; }
    public double Seconds { get; set; }
    public string? Error { get; set; }
}
