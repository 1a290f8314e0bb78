using System.Text.Json.Serialization;
using BFMig.Transfer.Memory;

namespace BFMig.Transfer.Store;

/// <summary>
/// <c>mem/state.json</c>: what a host knows about a guest's memory store. Written atomically
/// (temporary file, fsync, rename) at the end of every trip.
/// </summary>
public sealed class StoreState
{
    /// <summary>Bumped on both hosts at the end of every completed trip; 0 means "not in sync with any peer".</summary>
    public ulong Generation { get; set; }

    /// <summary>Hex XxHash128 over the block list and page-hash index (see <see cref="MemoryStore.ComputeDigest"/>).</summary>
    public string Digest { get; set; } = "";

    /// <summary>Seed of the page hashes, shared by the two hosts of a guest, never shown to the guest.</summary>
    public ulong Seed { get; set; }

    /// <summary>Name of the peer host this store was last synchronised with.</summary>
    public string? Peer { get; set; }

    /// <summary>"here" (the guest runs on this host) or "away" (it left for <see cref="Peer"/>).</summary>
    public string Location { get; set; } = "here";

    /// <summary>When <see cref="Location"/> last changed.</summary>
    public DateTimeOffset Since { get; set; }

    /// <summary>False when the last trip's memory stream was not fully parsed (multifd, postcopy, unknown sections).</summary>
    public bool SnapshotComplete { get; set; }

    /// <summary>Reserved for the disk block map (kept in <c>disk/</c>): its digest, carried in the nbd stream's hello.</summary>
    public string? DiskDigest { get; set; }
}

/// <summary>One entry of <c>mem/blocks.json</c>.</summary>
public sealed class StoredBlock
{
    public string Name { get; set; } = "";
    public long Length { get; set; }
    /// <summary>File stem of this block's <c>.pages</c> and <c>.hash</c> files inside <c>mem/</c>.</summary>
    public string File { get; set; } = "";
}

[JsonSourceGenerationOptions(WriteIndented = true, PropertyNamingPolicy = JsonKnownNamingPolicy.CamelCase)]
[JsonSerializable(typeof(StoreState))]
[JsonSerializable(typeof(List<StoredBlock>))]
internal sealed partial class StoreJsonContext : JsonSerializerContext;
