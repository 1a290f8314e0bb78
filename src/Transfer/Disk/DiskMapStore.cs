using System.IO.Hashing;
using System.Text;

namespace BFMig.Transfer.Disk;

/// <summary>
/// Where a guest's disk block maps live (<c>ROOT/UUID/disk/EXPORT.map</c>, one per NBD export,
/// i.e. per disk) and which of them may be used for elision. Both hosts keep the same map of an
/// export after a confirmed trip, so the local map is also the peer view.
/// </summary>
public static class DiskMapStore
{
    /// <summary>Block size of every disk map this helper writes.</summary>
    public const int BlockSize = DiskBlockHash.DefaultBlockSize;

    /// <summary>The map file of <paramref name="exportName"/> for <paramref name="guest"/> under <paramref name="root"/>.</summary>
    public static string MapPath(string root, Guid guest, string exportName) =>
        Path.Combine(root, guest.ToString("D"), "disk", FileNameFor(exportName) + ".map");

    /// <summary>
    /// A file name for an export name: kept when it is plain (letters, digits, '.', '_', '-', not
    /// starting with '.'), otherwise made plain and suffixed with a hash of the original so that
    /// two names never share a file. The empty name (qemu-nbd's default export) is <c>0</c>.
    /// </summary>
    public static string FileNameFor(string exportName)
    {
        if (exportName.Length == 0) return "0";
        var sb = new StringBuilder(exportName.Length);
        foreach (char c in exportName)
            sb.Append(char.IsAsciiLetterOrDigit(c) || c is '.' or '_' or '-' ? c : '_');
        string plain = sb.ToString();
        if (plain == exportName && plain[0] != '.' && plain.Length <= 128) return plain;
        ulong h = XxHash64.HashToUInt64(Encoding.UTF8.GetBytes(exportName));
        return $"{plain.TrimStart('.')[..Math.Min(plain.TrimStart('.').Length, 96)]}-{h:x16}";
    }

    /// <summary>
    /// The map saved at <paramref name="path"/> and what its journal puts in doubt, if the map may
    /// be trusted outside that doubt: present, readable, its last trip clean, of the current
    /// format (an older one, hashed with a guest-derivable seed, is refused by
    /// <see cref="DiskBlockMap.Load"/>), made with this helper's block size and a real key, and
    /// not wholly in doubt. Otherwise the map is null and <c>Why</c> says why (the trip then sends
    /// everything).
    /// </summary>
    public static (DiskBlockMap? Saved, DiskDoubt Doubt, string? Why) LoadRetained(string path)
    {
        if (!File.Exists(path)) return (null, DiskDoubt.All, "no map of this export yet");
        DiskBlockMap map;
        DiskDoubt doubt;
        try
        {
            doubt = DiskDoubtJournal.Read(path);
            if (doubt.Whole)
                return (null, doubt, "every block of the map is in doubt (its image was written outside a journaled trip, or the journal is unreadable)");
            map = DiskBlockMap.Load(path);
        }
        catch (Exception e) when (e is DiskMapException or IOException or UnauthorizedAccessException)
        {
            return (null, DiskDoubt.All, $"map unreadable: {e.Message}");
        }
        return Unsound(map) is { } why ? (null, DiskDoubt.All, why) : (map, doubt, null);
    }

    /// <summary>
    /// The map saved at <paramref name="path"/> whatever its journal says, if it is otherwise as
    /// <see cref="LoadRetained"/> requires; null otherwise. Only a re-hash of the image may use a
    /// map wholly in doubt (<see cref="DiskRehash"/>): it proves each block itself.
    /// </summary>
    public static DiskBlockMap? LoadSound(string path)
    {
        try
        {
            var map = DiskBlockMap.Load(path);
            return Unsound(map) is null ? map : null;
        }
        catch (Exception e) when (e is DiskMapException or IOException or UnauthorizedAccessException)
        {
            return null;
        }
    }

    private static string? Unsound(DiskBlockMap map) =>
        map.LastTripUnclean ? "the map's last trip ended unclean"
        : map.BlockSize != BlockSize ? $"the map has {map.BlockSize}-byte blocks, this helper {BlockSize}"
        : map.HashKey.Equals(DiskHashKey.Unkeyed) ? "the map has no hash key"
        : null;

    /// <summary>
    /// The map at <paramref name="path"/> with every block in doubt unknown, if it may be trusted
    /// (<see cref="LoadRetained"/>); null otherwise.
    /// </summary>
    public static DiskBlockMap? LoadTrusted(string path)
    {
        var (saved, doubt, _) = LoadRetained(path);
        return saved is null ? null : doubt.Apply(saved);
    }

    /// <summary>
    /// Why <paramref name="map"/> must not be trusted for the image behind
    /// <paramref name="exportName"/> on this host, or null when its identity is that image as it
    /// is now. A map without an identity, with one not captured yet, or for an export whose image
    /// this helper was not told is refused: nothing else can rule out that the image was written
    /// since (a guest started here, qemu-img, a restored backup, another file at that path).
    /// </summary>
    public static string? IdentityMismatch(DiskBlockMap map, string exportName, IReadOnlyDictionary<string, DiskImageSpec> images)
    {
        if (!images.TryGetValue(exportName, out var image))
            return $"no image known for export '{exportName}' (bfmig-transfer --image)";
        if (File.Exists(image.Path) && !DiskImageIdentity.IsRegularFile(image.Path))
            return $"{image.Path} is a block device: its timestamps cannot tell whether it was written";
        if (map.Identity is null)
            return "the map names no image (it was recorded while the image was in use)";
        if (map.Identity.IsPending)
            return $"the identity of {map.Identity.Path} was never captured after its QEMU let go of it";
        DiskImageIdentity now;
        try
        {
            now = DiskImageIdentity.Capture(image.Path, image.Format);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            return $"cannot read image {image.Path}: {e.Message}";
        }
        return now == map.Identity ? null : $"image changed since the map was made (map: {map.Identity.Describe()}; now: {now.Describe()})";
    }

    /// <summary>
    /// Creates the guest's disk directory; false (with a line on stderr) when that fails, so the
    /// stream is carried plainly instead of failing later on a store it cannot write.
    /// </summary>
    public static bool TryPrepare(string root, Guid guest)
    {
        string dir = Path.Combine(root, guest.ToString("D"), "disk");
        try
        {
            Directory.CreateDirectory(dir);
            return true;
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            TransferLog.Note($"bfmig-transfer: carrying the disk without maps: {dir}: {e.Message}");
            return false;
        }
    }

}

/// <summary>
/// The retained view handed to the NBD filter (sender) or observer (receiver) before the export
/// is known. Geometry is fixed; the map behind it is chosen when the two helpers have agreed on
/// the export named in the handshake (both read it only when transmission starts). Until then,
/// and whenever they disagree, every block is unknown.
/// </summary>
public sealed class AgreedDiskView : IDiskBlockView
{
    private volatile DiskBlockMap? _map;
    private volatile DiskHashKey _key = DiskHashKey.Unkeyed;

    /// <summary>
    /// Hashes blocks under <paramref name="key"/> from now on: the key the sender announced for
    /// the export (its map's, or a fresh one), set before the export's transmission starts.
    /// </summary>
    public void UseKey(DiskHashKey key) => _key = key;

    /// <summary>Uses <paramref name="map"/> (null: all unknown).</summary>
    public void Use(DiskBlockMap? map) => _map = map;

    /// <summary>True when a map is in use.</summary>
    public bool HasMap => _map is not null;

    /// <inheritdoc/>
    public int BlockSize => DiskMapStore.BlockSize;

    /// <inheritdoc/>
    public DiskHashKey HashKey => _key;

    /// <inheritdoc/>
    public ulong ImageSize => _map?.ImageSize ?? 0;

    /// <inheritdoc/>
    public long BlockCount => _map?.BlockCount ?? 0;

    /// <inheritdoc/>
    public bool TryGetHash(long blockIndex, out UInt128 hash)
    {
        if (_map is { } m) return m.TryGetHash(blockIndex, out hash);
        hash = default;
        return false;
    }
}
