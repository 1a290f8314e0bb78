using System.Runtime.InteropServices;
using System.Text.Json.Serialization;
using System.Text.Json;
using BFMig.Contracts;
using BFMig.Native.Linux;
using BFMig.Transfer.Disk;
using BFMig.Transfer.Memory;
using BFMig.Transfer.Store;

namespace BFMig.Daemon.Guests;

/// <summary>What the daemon knows about one retained guest.</summary>
/// <param name="Uuid">The guest's UUID (the directory name).</param>
/// <param name="Name">The guest's name as last seen, or "" if never seen by this daemon.</param>
/// <param name="State">The transfer store's <c>mem/state.json</c>, null when there is none yet.</param>
/// <param name="Place">The location record (<c>location.json</c>), null when there is none.</param>
/// <param name="MemoryBytes">Retained memory (the sum of the RAM blocks in <c>mem/blocks.json</c>).</param>
/// <param name="DiskBytes">Retained disk: the virtual size of every disk block map in <c>disk/*.map</c>.</param>
public sealed record GuestRecord(Guid Uuid, string Name, StoreState? State, LocationRecord? Place, ulong MemoryBytes, ulong DiskBytes)
{
    /// <summary>"here", "away" or "unknown" (no location record).</summary>
    public string Location => Place is { } p ? LocationRecord.Spell(p.Place) : "unknown";
}

/// <summary>
/// The per-guest state directories under <c>state_dir</c>, shared with bfmig-transfer so that
/// there is one source of truth. Per guest <c>STATE_DIR/UUID/</c>:
/// <list type="bullet">
/// <item><c>location.json</c>: where the guest runs (<see cref="LocationRecord"/>), written only by
/// the guest's <see cref="GuestSession"/>.</item>
/// <item><c>mem/state.json</c>: the transfer store's <see cref="StoreState"/>, written by the helpers
/// at the end of each memory stream and only read here.</item>
/// <item><c>name</c>: the guest's name (one line, daemon only), for listings and for
/// <c>bfmig forget NAME</c> after the guest left.</item>
/// <item><c>mem/blocks.json</c>, <c>mem/*.pages|hash</c>, <c>disk/*.map</c>: read for sizes and estimates.</item>
/// </list>
/// </summary>
public sealed partial class GuestStateStore
{
    private readonly string _root;

    public GuestStateStore(string root) => _root = root;

    /// <summary>The state directory of all guests.</summary>
    public string Root => _root;

    /// <summary><c>STATE_DIR/UUID</c>.</summary>
    public string GuestDirectory(Guid uuid) => Path.Combine(_root, uuid.ToString("D"));

    private string StatePath(Guid uuid) => Path.Combine(GuestDirectory(uuid), "mem", "state.json");

    /// <summary>Reads one guest's record; null when nothing is retained for it.</summary>
    public GuestRecord? Read(Guid uuid)
    {
        var dir = GuestDirectory(uuid);
        if (!Directory.Exists(dir))
            return null;
        return new GuestRecord(uuid, ReadName(dir), ReadState(uuid), ReadLocation(uuid).Record, MemoryBytes(dir), DiskBytes(dir));
    }

    /// <summary>Every guest with a state directory.</summary>
    public IEnumerable<Guid> Uuids()
    {
        if (!Directory.Exists(_root))
            yield break;
        foreach (var dir in Directory.EnumerateDirectories(_root))
        {
            if (Guid.TryParseExact(Path.GetFileName(dir), "D", out var uuid))
                yield return uuid;
        }
    }

    /// <summary>
    /// The guest's location record: (null, null) when there is none; (null, why) when one exists but
    /// cannot be read or parsed (the problem names the file). Callers must not treat the second as
    /// the first: the unreadable record may say the guest is away.
    /// </summary>
    public (LocationRecord? Record, string? Problem) ReadLocation(Guid uuid)
    {
        var record = LocationRecord.Read(_root, uuid, out var problem);
        return (record, problem);
    }

    /// <summary>
    /// Writes the guest's location record (atomically). Only a <see cref="GuestSession"/> calls this
    /// (and tests setting a scene): it is the record's one writer.
    /// </summary>
    public void WriteLocation(Guid uuid, LocationRecord record)
    {
        Directory.CreateDirectory(GuestDirectory(uuid), UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.UserExecute);
        DurableFile.WriteAtomically(DefaultPaths.LocationFile(_root, uuid), record.ToJson());
    }

    /// <summary>Every retained guest, ordered by name then UUID.</summary>
    public IReadOnlyList<GuestRecord> List()
    {
        if (!Directory.Exists(_root))
            return [];
        var records = new List<GuestRecord>();
        foreach (var dir in Directory.EnumerateDirectories(_root))
        {
            if (Guid.TryParseExact(Path.GetFileName(dir), "D", out var uuid) && Read(uuid) is { } record)
                records.Add(record);
        }
        records.Sort((a, b) => a.Name != b.Name ? string.CompareOrdinal(a.Name, b.Name) : a.Uuid.CompareTo(b.Uuid));
        return records;
    }

    /// <summary>Finds a retained guest by UUID or by its recorded name.</summary>
    public GuestRecord? Find(string nameOrUuid)
    {
        if (Guid.TryParse(nameOrUuid, out var uuid))
            return Read(uuid);
        return List().FirstOrDefault(r => r.Name == nameOrUuid);
    }

    /// <summary>The state file, or null when there is none (or it cannot be read: then nothing is known).</summary>
    public StoreState? ReadState(Guid uuid)
    {
        var path = StatePath(uuid);
        try
        {
            return File.Exists(path) ? JsonSerializer.Deserialize(File.ReadAllBytes(path), DaemonStateJsonContext.Default.StoreState) : null;
        }
        catch (Exception e) when (e is IOException or JsonException or UnauthorizedAccessException)
        {
            return null;
        }
    }

    /// <summary>Remembers the guest's name next to its state (so it can be listed and forgotten by name once gone).</summary>
    public void SaveName(Guid uuid, string name)
    {
        var dir = GuestDirectory(uuid);
        Directory.CreateDirectory(dir, UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.UserExecute);
        var path = Path.Combine(dir, "name");
        if (ReadName(dir) == name)
            return;
        DurableFile.WriteAtomically(path, System.Text.Encoding.UTF8.GetBytes(name + "\n"));
    }

    /// <summary>
    /// Deletes everything retained for the guest. Takes the store's lock first, so a helper that is
    /// using it makes this fail (<see cref="IOException"/>) rather than lose its files mid-trip.
    /// </summary>
    public void Delete(Guid uuid)
    {
        var dir = GuestDirectory(uuid);
        var mem = Path.Combine(dir, "mem");
        if (!Directory.Exists(dir))
            return;
        // Rename first: once the lock is held, the directory leaves the store atomically, and a
        // helper starting now creates a fresh, empty store instead of reusing half-deleted files.
        var doomed = Path.Combine(_root, $".forget-{uuid:D}-{Environment.TickCount64}");
        if (Directory.Exists(mem))
        {
            using var guard = Lock(mem);
            Directory.Move(dir, doomed);
        }
        else
        {
            Directory.Move(dir, doomed);
        }
        Directory.Delete(doomed, recursive: true);
    }

    private static FileStream Lock(string mem)
    {
        try
        {
            // FileShare.None is an exclusive flock, the lock MemoryStore takes in the helper.
            return new FileStream(Path.Combine(mem, "lock"), FileMode.OpenOrCreate, FileAccess.ReadWrite, FileShare.None);
        }
        catch (IOException e)
        {
            throw new IOException($"the store {mem} is in use by a transfer helper", e);
        }
    }

    private static string ReadName(string dir)
    {
        try
        {
            var path = Path.Combine(dir, "name");
            return File.Exists(path) ? File.ReadAllText(path).Trim() : "";
        }
        catch (IOException)
        {
            return "";
        }
    }

    private static ulong MemoryBytes(string dir)
    {
        var path = Path.Combine(dir, "mem", "blocks.json");
        try
        {
            if (!File.Exists(path))
                return 0;
            var blocks = JsonSerializer.Deserialize(File.ReadAllBytes(path), DaemonStateJsonContext.Default.ListStoredBlock) ?? [];
            return (ulong)blocks.Sum(b => Math.Max(0, b.Length));
        }
        catch (Exception e) when (e is IOException or JsonException)
        {
            return 0;
        }
    }

    /// <summary>Virtual disk sizes from the block maps' headers (image size at byte 32, little-endian).</summary>
    private static ulong DiskBytes(string dir)
    {
        ulong total = 0;
        foreach (var (size, _, _) in DiskMaps(dir))
            total += size;
        return total;
    }

    /// <summary>Per disk block map: virtual size, block size and how many blocks are unknown.</summary>
    internal static IEnumerable<(ulong ImageSize, int BlockSize, long UnknownBlocks)> DiskMaps(string dir)
    {
        var disk = Path.Combine(dir, "disk");
        if (!Directory.Exists(disk))
            yield break;
        foreach (var file in Directory.EnumerateFiles(disk, "*.map"))
        {
            DiskBlockMap map;
            try
            {
                map = DiskBlockMap.Load(file);
            }
            catch (Exception e) when (e is IOException or DiskMapException or UnauthorizedAccessException)
            {
                continue;
            }
            yield return (map.ImageSize, map.BlockSize, map.BlockCount - map.KnownCount);
        }
    }

    /// <summary>Per RAM block: length and how many of its pages have no known hash (never received, or lost in a crash).</summary>
    internal static IEnumerable<(long Length, long UnknownPages)> MemoryBlocks(string dir)
    {
        var mem = Path.Combine(dir, "mem");
        var path = Path.Combine(mem, "blocks.json");
        List<StoredBlock> blocks;
        try
        {
            blocks = File.Exists(path) ? JsonSerializer.Deserialize(File.ReadAllBytes(path), DaemonStateJsonContext.Default.ListStoredBlock) ?? [] : [];
        }
        catch (Exception e) when (e is IOException or JsonException)
        {
            yield break;
        }
        foreach (var block in blocks)
        {
            if (block.Length <= 0 || block.File.Contains('/'))
                continue;
            yield return (block.Length, CountUnknownHashes(Path.Combine(mem, block.File + ".hash"), block.Length / 4096));
        }
    }

    private static long CountUnknownHashes(string hashPath, long pages)
    {
        try
        {
            using var file = new FileStream(hashPath, FileMode.Open, FileAccess.Read, FileShare.ReadWrite, 1 << 16);
            if (file.Length != pages * 16)
                return pages;
            var buffer = new byte[1 << 16];
            long unknown = 0;
            int n;
            while ((n = file.Read(buffer)) > 0)
            {
                foreach (var hash in MemoryMarshal.Cast<byte, UInt128>(buffer.AsSpan(0, n & ~15)))
                {
                    if (hash == UInt128.Zero)
                        unknown++;
                }
            }
            return unknown;
        }
        catch (IOException)
        {
            return pages;
        }
    }
}

/// <summary>The helper's file formats, read and written with the same JSON conventions it uses.</summary>
[JsonSourceGenerationOptions(WriteIndented = true, PropertyNamingPolicy = JsonKnownNamingPolicy.CamelCase)]
[JsonSerializable(typeof(StoreState))]
[JsonSerializable(typeof(List<StoredBlock>))]
internal sealed partial class DaemonStateJsonContext : JsonSerializerContext;
