using BFMig.Contracts;
using BFMig.Native.DBus;

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

    private readonly string? _address;

    private DaemonClient(DBusConnection connection, string? address)
    {
        Connection = connection;
        _address = address;
    }

    public DBusConnection Connection { get; }

    /// <summary>Where the bus is, for messages: the address, or "the system bus".</summary>
    public string BusDescription => _address is null ? "the system bus" : $"the bus at {_address}";

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
            DBusConnection connection = address is null ? DBusConnection.OpenSystem() : DBusConnection.Open(address);
            return new DaemonClient(connection, address);
        }
        catch (DBusException e)
        {
            string where = address is null ? "the system bus" : $"the bus at {address}";
            throw new CommandFailedException($"cannot connect to {where}: {e.ErrorMessage}", e);
        }
    }

    public Dictionary<string, object> GetStatus() =>
        Call("GetStatus", null, static r => r.ReadVariantDictionary(), QuickTimeout);

    public IReadOnlyList<RetainedGuest> ListGuests() =>
        Call("ListGuests", null, RetainedGuest.ReadArray, QuickTimeout);

    /// <summary>Each guest's last trip; empty from a daemon older than ListTrips.</summary>
    public IReadOnlyList<LastTrip> ListTrips()
    {
        try
        {
            return Call("ListTrips", null, LastTrip.ReadArray, QuickTimeout);
        }
        catch (CommandFailedException e) when (e.InnerException is DBusException { ErrorName: DBusErrorNames.UnknownMethod })
        {
            return [];
        }
    }

    public void Forget(string guest) =>
        Call("Forget", w => w.WriteString(guest), static _ => true, QuickTimeout);

    public TripEstimate Estimate(string guest, string peer) =>
        Call("Estimate", w =>
        {
            w.WriteString(guest);
            w.WriteString(peer);
        }, static r => new TripEstimate(
            DiskBytes: r.ReadUInt64(),
            MemoryBytes: r.ReadUInt64(),
            StockDiskBytes: r.ReadUInt64(),
            StockMemoryBytes: r.ReadUInt64(),
            Basis: r.ReadString()), SlowTimeout);

    public MigrationUris PrepareMigration(string guest, string peer) =>
        Call("PrepareMigration", w =>
        {
            w.WriteString(guest);
            w.WriteString(peer);
        }, static r => new MigrationUris(r.ReadString(), r.ReadString(), r.ReadString()), SlowTimeout);

    public IReadOnlyList<DoctorCheck> Doctor() =>
        Call("Doctor", null, static r =>
        {
            var checks = new List<DoctorCheck>();
            if (r.EnterArray("(sbs)"))
            {
                while (r.EnterStruct("sbs"))
                {
                    checks.Add(new DoctorCheck(r.ReadString(), r.ReadBool(), r.ReadString()));
                    r.ExitContainer();
                }
                r.ExitContainer();
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
            return Connection.Call("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus", "GetNameOwner",
                static w => w.WriteString(BusName), static r => r.ReadString(), QuickTimeout);
        }
        catch (DBusException e)
        {
            throw Translate(e, "GetNameOwner");
        }
    }

    /// <summary>
    /// Completes once every message the daemon sent before now has been dispatched (its signals
    /// included): the Peer.Ping reply travels behind them and is handled on the same thread.
    /// Needs <see cref="DBusConnection.StartProcessing"/>.
    /// </summary>
    public Task FlushSignalsAsync() =>
        Connection.CallAsync(BusName, ObjectPath, "org.freedesktop.DBus.Peer", "Ping", null, static _ => true, QuickTimeout);

    private T Call<T>(string member, Action<DBusMessageWriter>? write, Func<DBusMessageReader, T> read, TimeSpan timeout)
    {
        try
        {
            return Connection.Call(BusName, ObjectPath, Interface, member, write, read, timeout);
        }
        catch (DBusException e)
        {
            throw Translate(e, member);
        }
    }

    /// <summary>Turns a D-Bus failure into the message an operator needs.</summary>
    public CommandFailedException Translate(DBusException e, string member) => e.ErrorName switch
    {
        DBusErrorNames.ServiceUnknown or "org.freedesktop.DBus.Error.NameHasNoOwner" => new CommandFailedException(NotRunningMessage, e),
        DBusErrorNames.AccessDenied => new CommandFailedException($"{member} was refused: {e.ErrorMessage} (state-changing commands need root)", e),
        DBusErrorNames.NoReply or DBusErrorNames.Timeout => new CommandFailedException($"bfmigd did not answer {member} in time: {e.ErrorMessage}", e),
        _ when e.Errno != 0 => new CommandFailedException($"talking to bfmigd on {BusDescription} failed ({member}): {e.ErrorMessage}", e),
        // bfmigd's own errors carry a message written for the operator; anything else keeps its name for a search.
        _ when e.ErrorName.StartsWith(BusName + ".Error.", StringComparison.Ordinal) => new CommandFailedException(e.ErrorMessage, e),
        _ => new CommandFailedException($"bfmigd: {e.ErrorMessage} ({e.ErrorName})", e),
    };

    private string NotRunningMessage => _address is null
        ? $"bfmigd is not running on the system bus ({BusName}): start it with `systemctl start bfmigd`"
        : $"bfmigd is not running on the bus at {_address} ({BusName})";

    public void Dispose() => Connection.Dispose();
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
    public static IReadOnlyList<RetainedGuest> ReadArray(DBusMessageReader reader)
    {
        var (type, contents) = reader.PeekType();
        if (type != 'a' || contents is not ("(sssstttx)" or "(ssssttx)"))
        {
            throw new DBusException(DBusErrorNames.InvalidArgs,
                $"ListGuests returned '{reader.Signature}', expected a(sssstttx) or a(ssssttx): bfmig and bfmigd versions differ?");
        }
        string structure = contents[1..^1];
        bool twoSizes = structure.Length == 8;
        var guests = new List<RetainedGuest>();
        reader.EnterArray(contents);
        while (reader.EnterStruct(structure))
        {
            string uuid = reader.ReadString();
            string name = reader.ReadString();
            string location = reader.ReadString();
            string peer = reader.ReadString();
            ulong generation = reader.ReadUInt64();
            ulong first = reader.ReadUInt64();
            ulong? second = twoSizes ? reader.ReadUInt64() : null;
            long since = reader.ReadInt64();
            reader.ExitContainer();
            guests.Add(second is { } disk
                ? new RetainedGuest(uuid, name, location, peer, generation, first, disk, first + disk, since)
                : new RetainedGuest(uuid, name, location, peer, generation, null, null, first, since));
        }
        reader.ExitContainer();
        return guests;
    }
}

/// <summary>One entry of ListTrips: how a guest's last migration went, from this host's side.</summary>
internal sealed record LastTrip(string Uuid, string Direction, string Path, bool MemoryOnly, string Peer, string Reason, long AtUnixSeconds)
{
    /// <summary>"accelerated", "accelerated, shared storage (memory only)", "bypassed".</summary>
    public string Summary => Path == "bypassed" || !MemoryOnly ? Path : Path + ", shared storage (memory only)";

    /// <summary>Reads <c>a(sssbssx)</c> as the contract lists it.</summary>
    public static IReadOnlyList<LastTrip> ReadArray(DBusMessageReader reader)
    {
        var (type, contents) = reader.PeekType();
        if (type != 'a' || contents != "(sssbssx)")
            throw new DBusException(DBusErrorNames.InvalidArgs, $"ListTrips returned '{reader.Signature}', expected a(sssbssx): bfmig and bfmigd versions differ?");
        var trips = new List<LastTrip>();
        reader.EnterArray(contents);
        while (reader.EnterStruct("sssbssx"))
        {
            trips.Add(new LastTrip(reader.ReadString(), reader.ReadString(), reader.ReadString(), reader.ReadBool(), reader.ReadString(), reader.ReadString(), reader.ReadInt64()));
            reader.ExitContainer();
        }
        reader.ExitContainer();
        return trips;
    }
}

internal sealed record TripEstimate(ulong DiskBytes, ulong MemoryBytes, ulong StockDiskBytes, ulong StockMemoryBytes, string Basis);

internal sealed record MigrationUris(string DestinationUri, string MigrateUri, string DisksUri);

internal sealed record DoctorCheck(string Name, bool Passed, string Detail);
