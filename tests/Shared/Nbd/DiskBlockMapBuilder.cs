using BFMig.Transfer.Disk.Nbd;
using BFMig.Transfer.Disk;

namespace BFMig.Tests.Shared.Nbd;

/// <summary>
/// Builds the block map of an existing image by reading all of it (through a read-only
/// qemu-nbd and <see cref="NbdClient"/>, so any format QEMU reads works). Costs a full read:
/// for first maps, tests and re-validation after the map was found stale.
/// </summary>
public static class DiskBlockMapBuilder
{
    /// <summary>Reads <paramref name="imagePath"/> and returns its map with identity attached.</summary>
    public static async Task<DiskBlockMap> BuildFromImageAsync(string imagePath, string format, int blockSize = DiskBlockHash.DefaultBlockSize, DiskHashKey? hashKey = null, CancellationToken ct = default)
    {
        // A block device has no identity (only a re-hash proves it).
        var identity = DiskImageIdentity.IsRegularFile(imagePath) ? DiskImageIdentity.Capture(imagePath, format) : null;
        string dir = Path.Combine(Path.GetTempPath(), "bfmig-map-" + Guid.NewGuid().ToString("N")[..12]);
        Directory.CreateDirectory(dir);
        try
        {
            string socket = Path.Combine(dir, "nbd.sock");
            await using var server = await QemuNbdServer.StartAsync(imagePath, format, socket, ["-r", "--cache=none", "--aio=threads"], TimeSpan.FromSeconds(20), ct);
            await using var stream = await server.ConnectAsync(ct);
            var map = await BuildAsync(stream, blockSize, hashKey, ct);
            map.Identity = identity;
            return map;
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }

    /// <summary>Reads a whole NBD export over <paramref name="nbd"/> and hashes every block.</summary>
    public static async Task<DiskBlockMap> BuildAsync(Stream nbd, int blockSize = DiskBlockHash.DefaultBlockSize, DiskHashKey? hashKey = null, CancellationToken ct = default)
    {
        const int chunk = 4 << 20;
        await using var client = await NbdClient.ConnectAsync(nbd, new NbdClientOptions { MaxRequest = chunk }, ct);
        var map = new DiskBlockMap(client.ExportSize, blockSize, hashKey);
        var buffer = new byte[Math.Max(chunk, blockSize)];
        long block = 0;
        for (ulong offset = 0; offset < client.ExportSize;)
        {
            int length = (int)Math.Min((ulong)buffer.Length, client.ExportSize - offset);
            await client.ReadAsync(offset, buffer.AsMemory(0, length), ct);
            for (int at = 0; at < length; at += blockSize, block++)
                map.Set(block, DiskBlockHash.Compute(buffer.AsSpan(at, Math.Min(blockSize, length - at)), map.HashKey));
            offset += (ulong)length;
        }
        await client.DisconnectAsync(ct);
        return map;
    }
}
