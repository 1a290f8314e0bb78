using System.Text.Json;
using System.Text.Json.Serialization;
using BFMig.Daemon.Transfers;
using BFMig.Native.Linux;
using BFMig.Transfer.Wire;

namespace BFMig.Daemon.Guests;

/// <summary>How a guest's streams reached BFMig.</summary>
public enum TripRoute
{
    /// <summary>The migration was given BFMig's socket URIs (<c>unix:///run/bfmig/PEER/GUEST.mig</c>).</summary>
    Explicit,

    /// <summary>Transparent mode redirected QEMU's plain <c>tcp://</c> connections to bfmigd.</summary>
    Transparent,
}

/// <summary>How one migration of a guest went, from this host's side (<c>STATE/UUID/trip.json</c>).</summary>
public sealed class TripRecord
{
    /// <summary>Path values.</summary>
    public const string Accelerated = "accelerated", AcceleratedTransparent = "accelerated (transparent)", Bypassed = "bypassed";

    /// <summary>"departure" (this host was the source) or "arrival".</summary>
    public string Direction { get; set; } = "";

    /// <summary><see cref="Accelerated"/>, <see cref="AcceleratedTransparent"/> or <see cref="Bypassed"/>.</summary>
    public string Path { get; set; } = "";

    /// <summary>No disk went through BFMig: the disks are on shared storage (or libvirt copied none).</summary>
    public bool MemoryOnly { get; set; }

    /// <summary>The other host, "" when unknown (a bypassing trip names none).</summary>
    public string Peer { get; set; } = "";

    /// <summary>Why, in one line.</summary>
    public string Reason { get; set; } = "";

    /// <summary>When the trip was recorded (unix seconds).</summary>
    public long AtUnixSeconds { get; set; }

    /// <summary>"accelerated", "accelerated, shared storage (memory only)", "bypassed", ...</summary>
    [JsonIgnore]
    public string Summary => Path == Bypassed || !MemoryOnly ? Path : Path + ", shared storage (memory only)";
}

/// <summary>Why transparent mode carried a departure's streams at stock cost (<see cref="TripRecorder.TakeCarried"/>).</summary>
/// <param name="Reason">The reason, as the record says it.</param>
/// <param name="Memory">True when it is the memory stream's.</param>
public sealed record CarriedStreams(string Reason, bool Memory);

/// <summary>
/// Owns each guest's last trip record: which streams of a trip went through BFMig and by which
/// route (<see cref="StreamStarted"/>), and what a departure or an arrival therefore was. A
/// libvirt Stopped/MIGRATED or Resumed/MIGRATED with no BFMig stream for the guest is a bypass:
/// no BFMig URI, and transparent mode off or unavailable. Bypassing trips change no retained
/// state, so a later BFMig trip still sends only the delta against the last snapshot BFMig kept.
/// </summary>
public sealed class TripRecorder(GuestStateStore store, TimeProvider time)
{
    /// <summary>The reason written for a bypass.</summary>
    public const string BypassReason = "no stream went through BFMig: no BFMig URI, and transparent mode off or unavailable";

    private readonly Lock _gate = new();
    private readonly Dictionary<(Guid, TransferDirection), Streams> _trips = [];
    // Why transparent mode carried a departing guest's streams byte for byte: until the trip ends
    // here (departure), the guest runs here again or stops (a failed migration), or the carried
    // streams have been closed for CarriedNoteLife (a migration that failed before the pause,
    // which libvirt reports with no event).
    private readonly Dictionary<Guid, CarriedNote> _carried = [];

    /// <summary>How long after its carried streams closed a note still describes the guest's departure.</summary>
    public static readonly TimeSpan CarriedNoteLife = TimeSpan.FromSeconds(60);

    private sealed class CarriedNote(string reason, bool memory)
    {
        public string Reason { get; set; } = reason;

        public bool Memory { get; set; } = memory;

        public int Open { get; set; }

        public long ClosedAt { get; set; }
    }

    private sealed class Streams(TripRoute route)
    {
        public TripRoute Route { get; set; } = route;

        public HashSet<StreamKind> Kinds { get; } = [];
    }

    /// <summary>The file of the guest's record.</summary>
    public string PathOf(Guid uuid) => System.IO.Path.Combine(store.GuestDirectory(uuid), "trip.json");

    /// <summary>
    /// A stream of the guest's trip reached BFMig (explicit mode: a connection on its socket;
    /// transparent mode: a redirected connection, pass <see cref="TripRoute.Transparent"/>).
    /// </summary>
    public void StreamStarted(Guid uuid, TransferDirection direction, StreamKind kind, TripRoute route)
    {
        lock (_gate)
        {
            if (!_trips.TryGetValue((uuid, direction), out var s))
                _trips[(uuid, direction)] = s = new Streams(route);
            // A memory stream through BFMig: a carried stream that has closed was an earlier attempt's.
            if (direction == TransferDirection.Send && kind == StreamKind.Mig && _carried.TryGetValue(uuid, out var note) && note.Open == 0)
                _carried.Remove(uuid);
            if (route == TripRoute.Transparent)
                s.Route = route;
            s.Kinds.Add(kind);
        }
    }

    /// <summary>
    /// Transparent mode carries a stream of the guest's departure (<paramref name="stream"/>:
    /// memory, disk, tls, ...) straight to the peer's QEMU, for <paramref name="why"/>, until the
    /// returned handle is disposed: the departure's record says so. The memory stream's reason
    /// wins over another's.
    /// </summary>
    public IDisposable StreamCarried(Guid uuid, string stream, string why)
    {
        var reason = $"transparent mode carried the {stream} stream at stock cost: {why}";
        lock (_gate)
        {
            if (!_carried.TryGetValue(uuid, out var note) || Stale(note))
                _carried[uuid] = note = new CarriedNote(reason, stream == "memory");
            else if (stream == "memory" && !note.Memory)
                (note.Reason, note.Memory) = (reason, true);
            note.Open++;
            return new DisposeAction(() => CarryEnded(note));
        }
    }

    // Closes one carried stream of the note it was opened on (a note removed or replaced
    // meanwhile counts it no more).
    private void CarryEnded(CarriedNote note)
    {
        lock (_gate)
        {
            if (note.Open > 0 && --note.Open == 0)
                note.ClosedAt = time.GetTimestamp();
        }
    }

    /// <summary>
    /// Takes why the guest's departing streams were carried, if they were (null otherwise), for
    /// <see cref="Departed"/>: taken when libvirt reports the departure, not when the record is
    /// written, so that a guest back here meanwhile (<see cref="NoDeparture"/>) does not lose it.
    /// </summary>
    public CarriedStreams? TakeCarried(Guid uuid)
    {
        lock (_gate)
            return _carried.Remove(uuid, out var note) && !Stale(note) ? new CarriedStreams(note.Reason, note.Memory) : null;
    }

    /// <summary>The guest runs here (Started, Resumed) or stopped without migrating: no departure is under way.</summary>
    public void NoDeparture(Guid uuid)
    {
        lock (_gate)
            _carried.Remove(uuid);
    }

    private bool Stale(CarriedNote note) => note.Open == 0 && time.GetElapsedTime(note.ClosedAt) > CarriedNoteLife;

    /// <summary>
    /// libvirt started the guest here for an incoming migration (Started/MIGRATED): its
    /// Resumed/MIGRATED will be an arrival, through BFMig or not. (A source whose migration
    /// failed also reports Resumed/MIGRATED, but never this.)
    /// </summary>
    public void IncomingStarted(Guid uuid)
    {
        lock (_gate)
            _trips.TryAdd((uuid, TransferDirection.Receive), new Streams(TripRoute.Explicit)); // a stream may have come first
    }

    /// <summary>
    /// The guest stopped here: an incoming trip that had not completed failed (its streams are
    /// void). Called for every Stopped event; a departure is recorded by <see cref="Departed"/> first.
    /// </summary>
    public void GuestStopped(Guid uuid)
    {
        lock (_gate)
            _trips.Remove((uuid, TransferDirection.Receive));
    }

    /// <summary>
    /// Records a departure; the disk verdicts say which disks BFMig carried, <paramref name="carriedStreams"/>
    /// (<see cref="TakeCarried"/>) which streams transparent mode carried at stock cost, and why.
    /// </summary>
    public TripRecord Departed(Departure departure, IReadOnlyList<DiskVerdict> verdicts, string? peer, CarriedStreams? carriedStreams)
    {
        Streams? streams;
        lock (_gate)
        {
            _trips.Remove((departure.Uuid, TransferDirection.Send), out streams);
        }
        var (carried, memoryCarried) = (carriedStreams?.Reason, carriedStreams?.Memory ?? false);
        var record = new TripRecord { Direction = "departure", Peer = departure.Trip is null ? "" : peer ?? "", AtUnixSeconds = time.GetUtcNow().ToUnixTimeSeconds() };
        if (departure.Trip is null)
        {
            record.Path = TripRecord.Bypassed;
            record.Reason = carried ?? BypassReason;
        }
        else
        {
            // Some streams through BFMig, and maybe one carried beside them (no free slot for it).
            record.Path = streams?.Route == TripRoute.Transparent ? TripRecord.AcceleratedTransparent : TripRecord.Accelerated;
            record.MemoryOnly = !verdicts.Any(v => v.Carried);
            var parts = new List<string> { memoryCarried ? carried! : "memory through BFMig" };
            parts.AddRange(verdicts.Select(v => v.Why));
            if (carried is not null && !memoryCarried)
                parts.Add(carried);
            record.Reason = string.Join("; ", parts);
        }
        Save(departure.Uuid, record);
        return record;
    }

    /// <summary>
    /// Records an arrival (libvirt's Resumed/MIGRATED here) from <paramref name="peer"/>; null when
    /// no incoming migration started here (a source resuming after a failed migration).
    /// </summary>
    public TripRecord? Arrived(Guid uuid, string? peer)
    {
        Streams? streams;
        lock (_gate)
        {
            if (!_trips.Remove((uuid, TransferDirection.Receive), out streams))
                return null;
        }
        var record = new TripRecord { Direction = "arrival", AtUnixSeconds = time.GetUtcNow().ToUnixTimeSeconds() };
        if (!streams.Kinds.Contains(StreamKind.Mig))
        {
            record.Path = TripRecord.Bypassed;
            record.Reason = BypassReason;
        }
        else
        {
            record.Peer = peer ?? "";
            record.Path = streams.Route == TripRoute.Transparent ? TripRecord.AcceleratedTransparent : TripRecord.Accelerated;
            record.MemoryOnly = !streams.Kinds.Contains(StreamKind.Nbd);
            record.Reason = record.MemoryOnly ? "memory through BFMig; no disk stream (shared storage: libvirt copied no disk)" : "memory and disks through BFMig";
        }
        Save(uuid, record);
        return record;
    }

    /// <summary>The guest's last trip, null when none was recorded (or the file cannot be read).</summary>
    public TripRecord? Read(Guid uuid)
    {
        try
        {
            var path = PathOf(uuid);
            return File.Exists(path) ? JsonSerializer.Deserialize(File.ReadAllBytes(path), TripRecordJsonContext.Default.TripRecord) : null;
        }
        catch (Exception e) when (e is IOException or JsonException or UnauthorizedAccessException)
        {
            return null;
        }
    }

    private void Save(Guid uuid, TripRecord record)
    {
        var dir = store.GuestDirectory(uuid);
        Directory.CreateDirectory(dir, UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.UserExecute);
        DurableFile.WriteAtomically(PathOf(uuid), JsonSerializer.SerializeToUtf8Bytes(record, TripRecordJsonContext.Default.TripRecord));
    }
}

[JsonSourceGenerationOptions(PropertyNamingPolicy = JsonKnownNamingPolicy.CamelCase)]
[JsonSerializable(typeof(TripRecord))]
internal sealed partial class TripRecordJsonContext : JsonSerializerContext;
