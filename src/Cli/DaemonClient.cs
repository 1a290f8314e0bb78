using BFMig.Bus;
using BFMig.Contracts;
using Tmds.DBus.Protocol;

namespace BFMig.Cli;

/// <summary>
/// Typed calls to bfmigd's org.bfmig.BFMig1.Manager (src/Daemon/org.bfmig.BFMig1.xml is the
/// contract). D-Bus failures become <see cref="CommandFailedException"/> with a message an
/// operator can act on; "nobody owns the name" becomes the "bfmigd is not running" message.
/// </summary>
internal sealed class DaemonClient : IDisposable
{
    public const string BusName = BusContract.BusName;
    public const string ObjectPath = BusContract.ObjectPath;
    public const string Interface = BusContract.Interface;
    public const string BusAddressVariable = BusContract.BusAddressVariable;

    private static readonly TimeSpan QuickTimeout = TimeSpan.FromSeconds(30);

    // PrepareMigration may have to create sockets and reach the peer; Estimate reads bitmaps.
    private static readonly TimeSpan SlowTimeout = TimeSpan.FromSeconds(120);

    private readonly BusClient _bus;

    private DaemonClient(BusClient bus) => _bus = bus;

    /// <summary>The Tmds connection (signal subscriptions).</summary>
    public DBusConnection Connection => _bus.Connection;

    /// <summary>Where the bus is, for messages: the address, or "the system bus".</summary>
    public string BusDescription => _bus.Address is null ? "the system bus" : $"the bus at {_bus.Address}";

    /// <summary>The address to use: the option, else <see cref="BusAddressVariable"/>, else null (system bus).</summary>
    public static string? ResolveAddress(string? option)
    {
        if (!string.IsNullOrEmpty(option))
        {
            return option;
        }
        string? fromEnvironment = Environment.GetEnvironmentVariable(BusAddressVariable);
        return string.IsNullOrEmpty(fromEnvironment) ? null : fromEnvironment;
    }

    /// <summary>Connects to the bus (not yet to the daemon: the first call finds out whether it runs).</summary>
    public static DaemonClient Connect(string? address)
    {
        try
        {
            return new DaemonClient(BusClient.Connect(address, QuickTimeout));
        }
        catch (Exception e) when (e is DBusExceptionBase or TimeoutException)
        {
            string where = address is null ? "the system bus" : $"the bus at {address}";
            throw new CommandFailedException($"cannot connect to {where}: {e.Message}", e);
        }
    }

    public Dictionary<string, object> GetStatus() =>
        Call("GetStatus", "", null, static (m, _) =>
        {
            Reader r = m.GetBodyReader();
            return Variants.ReadDictionary(ref r);
        }, QuickTimeout);

    public IReadOnlyList<RetainedGuest> ListGuests() =>
        Call("ListGuests", "", null, static (m, _) => RetainedGuest.ReadArray(m), QuickTimeout);

    /// <summary>Each guest's last trip; empty from a daemon older than ListTrips.</summary>
    public IReadOnlyList<LastTrip> ListTrips()
    {
        try
        {
            return Call("ListTrips", "", null, static (m, _) => LastTrip.ReadArray(m), QuickTimeout);
        }
        catch (CommandFailedException e) when (e.InnerException is DBusErrorReplyException { ErrorName: BusErrorNames.UnknownMethod })
        {
            return [];
        }
    }

    /// <summary>What each guest's state occupies on disk, and the retention limits; (empty, null) from a daemon older than ListStoreCosts.</summary>
    public (IReadOnlyList<StoreCost> Costs, string? Limits) ListStoreCosts()
    {
        try
        {
            return Call("ListStoreCosts", "", null, static (m, _) => StoreCost.Read(m), QuickTimeout);
        }
        catch (CommandFailedException e) when (e.InnerException is DBusErrorReplyException { ErrorName: BusErrorNames.UnknownMethod })
        {
            return ([], null);
        }
    }

    public void Forget(string guest) =>
        Call("Forget", "s", (ref MessageWriter w) => w.WriteString(guest), static (_, _) => true, QuickTimeout);

    public TripEstimate Estimate(string guest, string peer) =>
        Call("Estimate", "ss", (ref MessageWriter w) =>
        {
            w.WriteString(guest);
            w.WriteString(peer);
        }, static (m, _) =>
        {
            Reader r = m.GetBodyReader();
            return new TripEstimate(
                DiskBytes: r.ReadUInt64(),
                MemoryBytes: r.ReadUInt64(),
                StockDiskBytes: r.ReadUInt64(),
                StockMemoryBytes: r.ReadUInt64(),
                Basis: r.ReadString());
        }, SlowTimeout);

    public MigrationUris PrepareMigration(string guest, string peer) =>
        Call("PrepareMigration", "ss", (ref MessageWriter w) =>
        {
            w.WriteString(guest);
            w.WriteString(peer);
        }, static (m, _) =>
        {
            Reader r = m.GetBodyReader();
            return new MigrationUris(r.ReadString(), r.ReadString(), r.ReadString());
        }, SlowTimeout);

    public IReadOnlyList<DoctorCheck> Doctor() =>
        Call("Doctor", "", null, static (m, _) =>
        {
            Reader r = m.GetBodyReader();
            var checks = new List<DoctorCheck>();
            ArrayEnd end = r.ReadArrayStart(DBusType.Struct);
            while (r.HasNext(end))
            {
                r.AlignStruct();
                checks.Add(new DoctorCheck(r.ReadString(), r.ReadBool(), r.ReadString()));
            }
            return checks;
        }, SlowTimeout);

    /// <summary>
    /// The unique bus name (":1.42") of the connection that owns <see cref="BusName"/>: signals
    /// carry that as their sender, so subscriptions filter on it and nobody else can fake progress.
    /// </summary>
    public string DaemonUniqueName()
    {
        try
        {
            return _bus.Call("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus", "GetNameOwner", "s",
                static (ref MessageWriter w) => w.WriteString(BusName), static (m, _) => m.GetBodyReader().ReadString(), QuickTimeout);
        }
        catch (Exception e) when (e is DBusExceptionBase or TimeoutException)
        {
            throw Translate(e, "GetNameOwner");
        }
    }

    /// <summary>
    /// Completes once every message the daemon sent before now has been dispatched (its signals
    /// included): the Peer.Ping reply travels behind them on the same connection.
    /// </summary>
    public Task FlushSignalsAsync() =>
        _bus.CallAsync(BusName, ObjectPath, "org.freedesktop.DBus.Peer", "Ping", "", null, static (_, _) => true, QuickTimeout);

    private T Call<T>(string member, string signature, BodyWriter? write, MessageValueReader<T> read, TimeSpan timeout)
    {
        try
        {
            return _bus.Call(BusName, ObjectPath, Interface, member, signature, write, read, timeout);
        }
        catch (Exception e) when (e is DBusExceptionBase or TimeoutException)
        {
            throw Translate(e, member);
        }
    }

    /// <summary>Turns a D-Bus failure into the message an operator needs.</summary>
    public CommandFailedException Translate(Exception e, string member) => e switch
    {
        DBusErrorReplyException { ErrorName: BusErrorNames.ServiceUnknown or BusErrorNames.NameHasNoOwner } => new CommandFailedException(NotRunningMessage, e),
        DBusErrorReplyException { ErrorName: BusErrorNames.AccessDenied } r =>
            new CommandFailedException($"{member} was refused: {r.ErrorMessage} (state-changing commands need root)", e),
        DBusErrorReplyException { ErrorName: BusErrorNames.NoReply or BusErrorNames.Timeout } r =>
            new CommandFailedException($"bfmigd did not answer {member} in time: {r.ErrorMessage}", e),
        TimeoutException => new CommandFailedException($"bfmigd did not answer {member} in time: {e.Message}", e),
        // bfmigd's own errors carry a message written for the operator; anything else keeps its name for a search.
        DBusErrorReplyException r when r.ErrorName.StartsWith(BusName + ".Error.", StringComparison.Ordinal) => new CommandFailedException(r.ErrorMessage, e),
        DBusErrorReplyException r => new CommandFailedException($"bfmigd: {r.ErrorMessage} ({r.ErrorName})", e),
        _ => new CommandFailedException($"talking to bfmigd on {BusDescription} failed ({member}): {e.Message}", e),
    };

    private string NotRunningMessage => _bus.Address is null
        ? $"bfmigd is not running on the system bus ({BusName}): start it with `systemctl start bfmigd`"
        : $"bfmigd is not running on the bus at {_bus.Address} ({BusName})";

    public void Dispose() => _bus.Dispose();
}

/// <summary>
/// One entry of ListGuests. <see cref="MemoryBytes"/> and <see cref="DiskBytes"/> are null when the
/// daemon's record carries only one size (see <see cref="ReadArray"/>).
/// </summary>
internal sealed record RetainedGuest(string Uuid, string Name, string Location, string Peer, ulong Generation,
    ulong? MemoryBytes, ulong? DiskBytes, ulong RetainedBytes, long SinceUnixSeconds)
{
    /// <summary>
    /// Reads <c>a(sssstttx)</c>: uuid, name, location, peer, generation, memory bytes, disk bytes,
    /// time, as the contract's comment lists them. The contract's signature line says
    /// <c>a(ssssttx)</c> (one size); that form is read too, its size taken as the total retained.
    /// </summary>
    public static IReadOnlyList<RetainedGuest> ReadArray(Message message)
    {
        string signature = message.SignatureAsString ?? "";
        if (signature is not ("a(sssstttx)" or "a(ssssttx)"))
        {
            throw new DBusUnexpectedValueException(
                $"ListGuests returned '{signature}', expected a(sssstttx) or a(ssssttx): bfmig and bfmigd versions differ?");
        }
        bool twoSizes = signature.Length == "a(sssstttx)".Length;
        var guests = new List<RetainedGuest>();
        Reader reader = message.GetBodyReader();
        ArrayEnd end = reader.ReadArrayStart(DBusType.Struct);
        while (reader.HasNext(end))
        {
            reader.AlignStruct();
            string uuid = reader.ReadString();
            string name = reader.ReadString();
            string location = reader.ReadString();
            string peer = reader.ReadString();
            ulong generation = reader.ReadUInt64();
            ulong first = reader.ReadUInt64();
            ulong? second = twoSizes ? reader.ReadUInt64() : null;
            long since = reader.ReadInt64();
            guests.Add(second is { } disk
                ? new RetainedGuest(uuid, name, location, peer, generation, first, disk, first + disk, since)
                : new RetainedGuest(uuid, name, location, peer, generation, null, null, first, since));
        }
        return guests;
    }
}

/// <summary>One entry of ListTrips: how a guest's last migration went, from this host's side.</summary>
internal sealed record LastTrip(string Uuid, string Direction, string Path, bool MemoryOnly, string Peer, string Reason, long AtUnixSeconds)
{
    /// <summary>"accelerated", "accelerated, shared storage (memory only)", "bypassed".</summary>
    public string Summary => Path == "bypassed" || !MemoryOnly ? Path : Path + ", shared storage (memory only)";

    /// <summary>Reads <c>a(sssbssx)</c> as the contract lists it.</summary>
    public static IReadOnlyList<LastTrip> ReadArray(Message message)
    {
        string signature = message.SignatureAsString ?? "";
        if (signature != "a(sssbssx)")
            throw new DBusUnexpectedValueException($"ListTrips returned '{signature}', expected a(sssbssx): bfmig and bfmigd versions differ?");
        var trips = new List<LastTrip>();
        Reader reader = message.GetBodyReader();
        ArrayEnd end = reader.ReadArrayStart(DBusType.Struct);
        while (reader.HasNext(end))
        {
            reader.AlignStruct();
            trips.Add(new LastTrip(reader.ReadString(), reader.ReadString(), reader.ReadString(), reader.ReadBool(), reader.ReadString(), reader.ReadString(), reader.ReadInt64()));
        }
        return trips;
    }
}

/// <summary>One entry of ListStoreCosts: what a guest's state occupies on disk, by part, and when it last changed.</summary>
internal sealed record StoreCost(string Uuid, ulong MemoryStoreBytes, ulong DiskMapBytes, ulong CheckpointBytes, ulong OtherBytes, long LastChangedUnixSeconds)
{
    public ulong TotalBytes => MemoryStoreBytes + DiskMapBytes + CheckpointBytes + OtherBytes;

    /// <summary>Reads <c>a(sttttx)s</c> as the contract lists it.</summary>
    public static (IReadOnlyList<StoreCost> Costs, string? Limits) Read(Message message)
    {
        string signature = message.SignatureAsString ?? "";
        if (signature != "a(sttttx)s")
            throw new DBusUnexpectedValueException($"ListStoreCosts returned '{signature}', expected a(sttttx)s: bfmig and bfmigd versions differ?");
        var costs = new List<StoreCost>();
        Reader reader = message.GetBodyReader();
        ArrayEnd end = reader.ReadArrayStart(DBusType.Struct);
        while (reader.HasNext(end))
        {
            reader.AlignStruct();
            costs.Add(new StoreCost(reader.ReadString(), reader.ReadUInt64(), reader.ReadUInt64(), reader.ReadUInt64(), reader.ReadUInt64(), reader.ReadInt64()));
        }
        return (costs, reader.ReadString());
    }
}

internal sealed record TripEstimate(ulong DiskBytes, ulong MemoryBytes, ulong StockDiskBytes, ulong StockMemoryBytes, string Basis);

internal sealed record MigrationUris(string DestinationUri, string MigrateUri, string DisksUri);

internal sealed record DoctorCheck(string Name, bool Passed, string Detail);
