using System.IO.Hashing;
using System.Runtime.InteropServices;
using System.Security.Cryptography;
using System.Text.Json;
using System.Text;
using BFMig.Native.Linux;
using BFMig.Transfer.Store;

namespace BFMig.Transfer.Memory;

/// <summary>
/// A guest's memory store on one host: <c>ROOT/UUID/mem/</c>. Both hosts of a guest keep their
/// stores identical (each trip's sender records what it sends, the receiver what it receives), so
/// the local index is also the peer view: what the other host holds, as of
/// <see cref="StoreState.Generation"/>/<see cref="StoreState.Digest"/>, which the hello confirms.
/// Crash consistency: a trip journals the pages it may write (<see cref="MemoryDoubtJournal"/>,
/// <c>INFLUX</c>) before it writes them, and a commit removes the journal after data, index and
/// state are durable. A trip that does not commit leaves the last committed index on disk and its
/// journal naming the pages in doubt: the next trip elides everything else (<see cref="Doubt"/>).
/// A journal that cannot be trusted puts the whole store in doubt: opened so, the store rehashes
/// every page from its data file and forgets its peer (the next trip sends everything).
/// </summary>
public sealed partial class MemoryStore : IDisposable
{
    /// <summary>How a failed trip found the store (<see cref="Abandon"/>).</summary>
    public enum StoreFault
    {
        /// <summary>Interrupted: the journal says what is in doubt.</summary>
        None,
        /// <summary>A retained page was not what its index says.</summary>
        PagesDiffer,
        /// <summary>The two hosts' indexes differ.</summary>
        IndexesDiffer,
    }

    private const string InfluxName = MemoryDoubtJournal.FileName;
    private readonly string _dir;
    private readonly FileStream _lock;
    private readonly List<BlockFile> _blocks = [];
    private static readonly byte[] ZeroPage = new byte[QemuFormat.PageSize];
    private readonly byte[] _scratch = new byte[QemuFormat.PageSize];
    // Pages mostly come in address order: consecutive writes go out as one pwrite, and sequential
    // single-page reads read ahead. Reads flush overlapping pending writes; writes invalidate read-ahead slots.
    internal const int BatchPages = 64;
    private readonly byte[] _writeBuffer = new byte[BatchPages * QemuFormat.PageSize];
    private int _writeBlock = -1;
    private long _writeFirst;
    private int _writeCount;
    private readonly byte[] _readBuffer = new byte[BatchPages * QemuFormat.PageSize];
    private readonly bool[] _readValid = new bool[BatchPages];
    private int _readBlock = -1;
    private long _readFirst;
    private int _readCount;
    private int _lastReadBlock = -1;
    private long _lastReadPage = -2;
    private PageLocator? _locator;
    private bool _locatorWanted;
    private bool _inTrip;
    private bool _pacedWriteback;
    private MemoryDoubtJournal? _journal;
    private TripWrites? _trip;

    /// <summary>
    /// Serialises the trip's codecs: the main stream's and its multifd channels' run on their own
    /// threads and take this around every call that reads or records pages. The store itself
    /// is single-threaded.
    /// </summary>
    public Lock Gate { get; } = new();

    private MemoryStore(string guestDir, FileStream lockFile, StoreState state)
    {
        GuestDirectory = guestDir;
        _dir = Path.Combine(guestDir, "mem");
        _lock = lockFile;
        State = state;
    }

    /// <summary>Default root of all guests' stores.</summary>
    public const string DefaultRoot = "/var/lib/bfmig";

    /// <summary><c>ROOT/UUID</c>.</summary>
    public string GuestDirectory { get; }

    /// <summary><c>ROOT/UUID/disk</c>: reserved for the disk block map.</summary>
    public string DiskDirectory => Path.Combine(GuestDirectory, "disk");

    /// <summary>The persisted state (generation, digest, seed, location).</summary>
    public StoreState State { get; private set; }

    /// <summary>True when the last open found an interrupted trip it could not follow and rebuilt the index.</summary>
    public bool Recovered { get; private set; }

    /// <summary>
    /// The pages that interrupted trips since the last commit may have changed on this host (never
    /// <see cref="MemoryDoubt.Whole"/> after an open: such a store is rebuilt at generation 0). After
    /// <see cref="Abandon"/>: what the failed trip leaves in doubt.
    /// </summary>
    public MemoryDoubt Doubt { get; private set; } = MemoryDoubt.None;

    /// <summary>The pages unknown for the current trip because either host had them in doubt (<see cref="MemoryDoubt.All"/>: the trip keeps nothing).</summary>
    public MemoryDoubt TripDoubt { get; private set; } = MemoryDoubt.None;

    /// <summary>Blocks of the current trip (after <see cref="BeginTrip"/>).</summary>
    public int BlockCount => _blocks.Count;

    /// <summary>The RAMBlock name (QEMU's idstr) of block <paramref name="block"/>.</summary>
    public string BlockName(int block) => _blocks[block].Name;

    /// <summary>True between <see cref="BeginTrip"/> and the commit or abandon: pages may be recorded.</summary>
    public bool InTrip => _inTrip;

    /// <summary>The index of the trip's block named <paramref name="name"/>, or -1.</summary>
    public int BlockIndex(string name) => _blocks.FindIndex(b => b.Name == name);

    /// <summary>
    /// Bounds the store's queued writeback while a trip writes it (the receiving side: its commit
    /// otherwise lands on the destination's switchover; see <see cref="BlockFile"/>).
    /// </summary>
    public bool PacedWriteback
    {
        get => _pacedWriteback;
        set
        {
            _pacedWriteback = value;
            foreach (var b in _blocks) b.PacedWriteback = value;
        }
    }

    /// <summary>Hash of an all-zero page under the current seed.</summary>
    public UInt128 ZeroHash { get; private set; }

    /// <summary>
    /// Opens (creating if needed) the store of <paramref name="guest"/> under <paramref name="root"/>,
    /// taking its lock, and recovers from an interrupted trip.
    /// <paramref name="lockWait"/>: how long to wait for a lock another helper holds (a trip that
    /// ended a moment ago may still be committing: <see cref="MigReceiver.GuestRuns"/>); zero: not at all.
    /// </summary>
    /// <exception cref="StoreException">another helper holds the lock (past <paramref name="lockWait"/>), or the store is unreadable.</exception>
    public static MemoryStore Open(string root, Guid guest, TimeSpan lockWait = default)
    {
        string guestDir = Path.Combine(root, guest.ToString("D"));
        string mem = Path.Combine(guestDir, "mem");
        Directory.CreateDirectory(mem);
        Directory.CreateDirectory(Path.Combine(guestDir, "disk"));
        FileStream lockFile;
        long deadline = Environment.TickCount64 + (long)lockWait.TotalMilliseconds;
        while (true)
        {
            try
            {
                lockFile = new FileStream(Path.Combine(mem, "lock"), FileMode.OpenOrCreate, FileAccess.ReadWrite, FileShare.None);
                break;
            }
            catch (IOException e)
            {
                if (Environment.TickCount64 >= deadline)
                    throw new StoreException($"memory store of {guest} is in use by another helper ({mem}/lock)", e);
                Thread.Sleep(50);
            }
        }
        try
        {
            var state = ReadState(mem) ?? new StoreState { Seed = NewSeed(), Since = DateTimeOffset.UtcNow, Digest = "" };
            var store = new MemoryStore(guestDir, lockFile, state);
            store.LoadBlocks(loadIndex: true);
            File.Delete(Path.Combine(mem, TripWrites.FileName));
            if (File.Exists(Path.Combine(mem, InfluxName)))
            {
                var doubt = MemoryDoubtJournal.Read(mem, out bool live);
                // A commit killed while it rewrote an index leaves it short: that index is unknown, so is the store.
                if (doubt.Whole || store._blocks.Any(b => !b.IndexLoaded))
                    store.Recover();
                else
                {
                    // A killed trip's live journal only holds in this boot's page cache: settle it to survive a reboot.
                    if (live) MemoryDoubtJournal.WriteSettled(mem, doubt);
                    store.Doubt = doubt;
                }
            }
            store.ZeroHash = HashPage(new byte[QemuFormat.PageSize], state.Seed);
            return store;
        }
        catch (Exception e) when (e is IOException or JsonException or UnauthorizedAccessException)
        {
            lockFile.Dispose();
            throw new StoreException($"memory store {mem} unreadable: {e.Message}", e);
        }
    }

    /// <summary>
    /// The store's state and doubt as its files say now, without creating, locking or recovering
    /// anything (null when the guest has no store yet, or its whole store is in doubt: opened, it is
    /// rebuilt with generation 0 and can match nothing). Enough to answer a hello.
    /// </summary>
    /// <exception cref="StoreException">the state file or journal is unreadable.</exception>
    public static (StoreState State, MemoryDoubt Doubt)? Peek(string root, Guid guest)
    {
        string mem = Path.Combine(root, guest.ToString("D"), "mem");
        try
        {
            var doubt = MemoryDoubtJournal.Read(mem, out _);
            if (doubt.Whole) return null;
            return ReadState(mem) is { } state ? (state, doubt) : null;
        }
        catch (Exception e) when (e is IOException or JsonException or UnauthorizedAccessException)
        {
            throw new StoreException($"memory store {mem} unreadable: {e.Message}", e);
        }
    }

    /// <summary>XxHash128 of a page under <paramref name="seed"/>; 0 is reserved for "unknown".</summary>
    public static UInt128 HashPage(ReadOnlySpan<byte> page, ulong seed)
    {
        var h = XxHash128.HashToUInt128(page, unchecked((long)seed));
        return h == UInt128.Zero ? UInt128.One : h;
    }

    /// <summary>Hash of a page under the store's seed.</summary>
    public UInt128 Hash(ReadOnlySpan<byte> page) => HashPage(page, State.Seed);

    private static ulong NewSeed() => BitConverter.ToUInt64(RandomNumberGenerator.GetBytes(8));

    private static StoreState? ReadState(string mem)
    {
        string path = Path.Combine(mem, "state.json");
        if (!File.Exists(path)) return null;
        return JsonSerializer.Deserialize(File.ReadAllBytes(path), StoreJsonContext.Default.StoreState);
    }

    private List<StoredBlock> ReadBlockList()
    {
        string path = Path.Combine(_dir, "blocks.json");
        if (!File.Exists(path)) return [];
        return JsonSerializer.Deserialize(File.ReadAllBytes(path), StoreJsonContext.Default.ListStoredBlock) ?? [];
    }

    private void LoadBlocks(bool loadIndex)
    {
        foreach (var b in ReadBlockList())
        {
            if (b.Length <= 0 || (b.Length & (QemuFormat.PageSize - 1)) != 0 || b.File.Contains('/'))
                throw new StoreException($"blocks.json entry '{b.Name}' is invalid");
            _blocks.Add(new BlockFile(Path.Combine(_dir, b.File + ".pages"), Path.Combine(_dir, b.File + ".hash"), b.Name, b.Length, loadIndex) { PacedWriteback = _pacedWriteback });
        }
    }

    private void Recover()
    {
        Recovered = true;
        foreach (var b in _blocks)
        {
            b.Rehash(State.Seed);
            b.Persist();
        }
        State.Generation = 0;
        State.Peer = null;
        State.Digest = ComputeDigest();
        DurableFile.WriteAtomically(Path.Combine(_dir, "state.json"), JsonSerializer.SerializeToUtf8Bytes(State, StoreJsonContext.Default.StoreState));
        File.Delete(Path.Combine(_dir, InfluxName));
        DurableFile.FsyncDirectory(_dir);
        Doubt = MemoryDoubt.None;
    }

    /// <summary>
    /// Starts a trip with the block layout <paramref name="blocks"/>. With <paramref name="keep"/>
    /// (hello matched and same seed), blocks with the same name and length keep their content;
    /// otherwise everything is forgotten and <paramref name="seed"/> becomes the store's seed.
    /// With <paramref name="keep"/> and the same layout, the pages in doubt on either host (this
    /// store's <see cref="Doubt"/> and <paramref name="peerDoubt"/>, the peer's: both sides must
    /// start from the same index) are unknown for the trip, and a journal follows every page it writes; otherwise the whole store
    /// is in doubt until the commit. Either is durable before anything else changes.
    /// </summary>
    public void BeginTrip(IReadOnlyList<RamBlockInfo> blocks, ulong seed, bool keep, bool buildLocator, MemoryDoubt? peerDoubt = null)
    {
        if (_inTrip) throw new InvalidOperationException("trip already started");
        _inTrip = true;
        _writeCount = 0;
        _readBlock = -1;
        _lastReadBlock = -1;
        var inDoubt = Doubt.Union(peerDoubt ?? MemoryDoubt.None);
        if (seed != State.Seed || inDoubt.Whole) keep = false;
        bool sameLayout = blocks.Count == _blocks.Count && blocks.Select((b, i) => b.Name == _blocks[i].Name && b.UsedLength == _blocks[i].Length).All(x => x);
        // A trip that changes the layout deletes and creates index files: no journal follows that.
        _journal = MemoryDoubtJournal.Begin(_dir, keep && sameLayout ? Doubt : MemoryDoubt.All);
        DurableFile.FsyncDirectory(_dir);
        TripDoubt = keep && sameLayout ? inDoubt : MemoryDoubt.All;
        // Whatever the new layout, a page in doubt must not keep its hash in a block the trip keeps
        // (a trip against this store's page index keeps same-named blocks of another layout too).
        if (keep)
        {
            foreach (var r in inDoubt.Ranges)
            {
                if (r.Block >= _blocks.Count) continue;
                var hashes = _blocks[r.Block].Hashes;
                Array.Clear(hashes, (int)Math.Min(r.First, hashes.LongLength), (int)(Math.Min(r.End, hashes.LongLength) - Math.Min(r.First, hashes.LongLength)));
            }
        }
        State.Seed = seed;
        ZeroHash = HashPage(new byte[QemuFormat.PageSize], seed);
        var old = _blocks.ToDictionary(b => b.Name, StringComparer.Ordinal);
        var layout = new List<StoredBlock>();
        var next = new List<BlockFile>();
        foreach (var info in blocks)
        {
            string stem = "b-" + XxHash64.HashToUInt64(Encoding.UTF8.GetBytes(info.Name)).ToString("x16");
            if (keep && old.Remove(info.Name, out var existing) && existing.Length == info.UsedLength)
            {
                next.Add(existing);
            }
            else
            {
                if (old.Remove(info.Name, out var stale)) DeleteBlock(stale);
                File.Delete(Path.Combine(_dir, stem + ".pages"));
                File.Delete(Path.Combine(_dir, stem + ".hash"));
                next.Add(new BlockFile(Path.Combine(_dir, stem + ".pages"), Path.Combine(_dir, stem + ".hash"), info.Name, info.UsedLength, loadIndex: false) { PacedWriteback = _pacedWriteback });
            }
            layout.Add(new StoredBlock { Name = info.Name, Length = info.UsedLength, File = stem });
        }
        foreach (var gone in old.Values) DeleteBlock(gone);
        _blocks.Clear();
        _blocks.AddRange(next);
        DurableFile.WriteAtomically(Path.Combine(_dir, "blocks.json"), JsonSerializer.SerializeToUtf8Bytes(layout, StoreJsonContext.Default.ListStoredBlock));

        _trip?.Dispose();
        _trip = new TripWrites(_dir, [.. _blocks.Select(b => b.PageCount)]);
        ConflictPages = 0;

        // Built on first use: a trip whose pages are all unchanged never needs it.
        _locator = null;
        _locatorWanted = buildLocator && PageLocator.Fits(_blocks.Count, _blocks.Count == 0 ? 0 : _blocks.Max(b => b.PageCount));
    }

    private PageLocator? Locator()
    {
        if (_locator is not null || !_locatorWanted) return _locator;
        var locator = new PageLocator(_blocks.Sum(b => b.PageCount));
        for (int bi = 0; bi < _blocks.Count; bi++)
        {
            var hashes = _blocks[bi].Hashes;
            for (long p = 0; p < hashes.LongLength; p++)
            {
                if (hashes[p] != UInt128.Zero && hashes[p] != ZeroHash) locator.Insert(hashes[p], bi, p);
                // A page the trip already changed is also found by its departure content (what channels reference).
                if (_trip is { } trip && trip.Modified(bi, p) && trip.PreservedHash(bi, p) is var departed
                    && departed != UInt128.Zero && departed != ZeroHash && departed != hashes[p])
                    locator.Insert(departed, bi, p);
            }
        }
        _locator = locator;
        return locator;
    }

    private static void DeleteBlock(BlockFile b)
    {
        b.Dispose();
        File.Delete(b.DataPath);
        File.Delete(b.HashPath);
    }

    /// <summary>Finds a page anywhere in the store whose current content, as the main stream sees it (<see cref="MainHash"/>), has <paramref name="hash"/> (sender only).</summary>
    public bool TryLocate(UInt128 hash, out int block, out long page) => TryLocate(hash, departure: false, out block, out page);

    /// <summary>Finds a page whose content when the trip began (<see cref="BaseHash"/>) has <paramref name="hash"/> (sender only): what a multifd channel may reference.</summary>
    public bool TryLocateBase(UInt128 hash, out int block, out long page) => TryLocate(hash, departure: true, out block, out page);

    private bool TryLocate(UInt128 hash, bool departure, out int block, out long page)
    {
        if (Locator() is { } locator)
        {
            var check = new HoldsHash(this, hash, departure);
            return locator.TryFind(hash, ref check, out block, out page);
        }
        block = -1;
        page = -1;
        return false;
    }

    private readonly struct HoldsHash(MemoryStore store, UInt128 hash, bool departure) : PageLocator.ICandidateCheck
    {
        public bool Holds(int block, long page) =>
            block < store._blocks.Count && page < store._blocks[block].PageCount
            && (departure ? store.BaseHash(block, page) : store.MainHash(block, page)) == hash;
    }

    /// <summary>XxHash128 over every block's name, length and page-hash index, in order: equal digests mean equal stores.</summary>
    public string ComputeDigest()
    {
        var h = new XxHash128();
        Span<byte> len = stackalloc byte[8];
        foreach (var b in _blocks)
        {
            h.Append(Encoding.UTF8.GetBytes(b.Name));
            BitConverter.TryWriteBytes(len, b.Length);
            h.Append(len);
            h.Append(MemoryMarshal.AsBytes(b.Hashes.AsSpan()));
        }
        return Convert.ToHexStringLower(h.GetCurrentHash());
    }

    /// <summary>
    /// Ends a trip: makes data and index durable, records generation and digest, then clears
    /// the in-flux mark. Returns the digest. Where the guest runs is not recorded here: bfmigd owns
    /// that record (location.json) and decides it when libvirt confirms the trip.
    /// </summary>
    public string Commit(ulong generation, string? peer, bool snapshotComplete)
    {
        FlushWrites();
        // The index files are rewritten next, pages made unknown or zero included: the journal covers those too.
        foreach (var r in _indexOnlyTouched) _journal?.Touching(r.Block, r.First, r.Count);
        _indexOnlyTouched.Clear();
        foreach (var b in _blocks) b.Persist();
        State.Generation = generation;
        State.Peer = peer;
        State.Digest = ComputeDigest();
        State.SnapshotComplete = snapshotComplete;
        DurableFile.WriteAtomically(Path.Combine(_dir, "state.json"), JsonSerializer.SerializeToUtf8Bytes(State, StoreJsonContext.Default.StoreState));
        if (_journal is not null)
            _journal.Clear();
        else
        {
            File.Delete(Path.Combine(_dir, InfluxName));
            DurableFile.FsyncDirectory(_dir);
        }
        _journal = null;
        Doubt = MemoryDoubt.None;
        _inTrip = false;
        EndTripWrites();
        return State.Digest;
    }

    /// <summary>
    /// Ends a failed trip without touching the committed index or state: the journal is settled to
    /// exactly the pages written so far (writes still buffered are dropped, never having reached
    /// the file) plus the earlier doubt, which becomes <see cref="Doubt"/>.
    /// <see cref="StoreFault.PagesDiffer"/> (a retained page was not what the index says: something
    /// other than a trip wrote the page files): every page is rehashed and those that differ from
    /// the committed index join the doubt, so that the next trip sends them in full instead of
    /// failing on them again. <see cref="StoreFault.IndexesDiffer"/> (or damage that the rehash
    /// cannot find): the index is rebuilt from the data and the store matches no peer
    /// (generation 0). The trip's in-memory index is stale afterwards: reopen to use the store.
    /// Returns false when no trip was under way (never started, or committed).
    /// </summary>
    public bool Abandon(StoreFault fault = StoreFault.None)
    {
        if (!_inTrip) return false;
        var damaged = fault == StoreFault.PagesDiffer ? FindDamage() : null;
        if (fault == StoreFault.IndexesDiffer || (fault == StoreFault.PagesDiffer && damaged is not { Count: > 0 }) || _journal is null || _journal.Doubt.Whole)
        {
            FlushWrites();
            foreach (var b in _blocks) b.Rehash(State.Seed);
            Commit(0, null, snapshotComplete: false);
            Doubt = MemoryDoubt.All;
            return true;
        }
        _writeCount = 0;
        _inTrip = false;
        EndTripWrites();
        Doubt = _journal.Doubt.Union(MemoryDoubt.Of(damaged ?? []));
        try
        {
            _journal.Settle(Doubt);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            // The live journal stays: it covers every write, and the next open settles it.
            TransferLog.Note($"bfmig-transfer: memory store journal not settled ({e.Message}); the next open settles it");
        }
        _journal = null;
        return true;
    }

    private void EndTripWrites()
    {
        _trip?.Dispose();
        _trip = null;
    }

    // Pages whose data no longer hashes to the committed index (null: an index file is unreadable).
    private List<PageRange>? FindDamage()
    {
        FlushWrites();
        var damaged = new List<PageRange>();
        for (int bi = 0; bi < _blocks.Count; bi++)
        {
            var committed = _blocks[bi].ReadCommittedIndex();
            if (committed is null) return null;
            var actual = _blocks[bi].HashData(State.Seed);
            for (long p = 0; p < actual.LongLength; p++)
            {
                if (committed[p] != UInt128.Zero && committed[p] != actual[p])
                    damaged.Add(new PageRange(bi, p, 1));
            }
        }
        if (damaged.Count > 0)
            TransferLog.Note($"bfmig-transfer: a retained page was not what the index says; {damaged.Count} pages differ from the committed index (this trip's own writes included): in doubt from now on");
        return damaged;
    }

    /// <inheritdoc/>
    public void Dispose()
    {
        EndTripWrites();
        _journal?.Dispose();
        foreach (var b in _blocks) b.Dispose();
        _blocks.Clear();
        _lock.Dispose();
    }
}
