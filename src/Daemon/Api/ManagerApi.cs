using BFMig.Contracts;
using BFMig.Daemon.Logging;
using BFMig.Bus;
using BFMig.Native.Linux;
using Microsoft.Extensions.Logging;
using Tmds.DBus.Protocol;

namespace BFMig.Daemon.Api;

/// <summary>A method failed in a way the caller should see by name (<c>org.bfmig.BFMig1.Error.*</c>).</summary>
public sealed class DaemonApiException(string errorName, string message) : Exception(message)
{
    public string ErrorName { get; } = errorName;
}

/// <summary>The D-Bus error names of the API.</summary>
public static class DaemonErrors
{
    public const string AccessDenied = "org.bfmig.BFMig1.Error.AccessDenied";
    public const string UnknownGuest = "org.bfmig.BFMig1.Error.UnknownGuest";
    public const string UnknownPeer = "org.bfmig.BFMig1.Error.UnknownPeer";
    public const string Busy = "org.bfmig.BFMig1.Error.Busy";
    public const string LimitExceeded = "org.bfmig.BFMig1.Error.LimitExceeded";
    public const string Failed = "org.bfmig.BFMig1.Error.Failed";
}

/// <summary>One retained guest, as ListGuests returns it.</summary>
public sealed record GuestListing(string Uuid, string Name, string Location, string Peer, ulong Generation, ulong MemoryBytes, ulong DiskBytes, long Since);

/// <summary>One guest's last trip, as ListTrips returns it.</summary>
public sealed record TripListing(string Uuid, string Direction, string Path, bool MemoryOnly, string Peer, string Reason, long At);

/// <summary>What one guest's state occupies on disk, as ListStoreCosts returns it (see <see cref="Guests.StoreCost"/>).</summary>
public sealed record StoreCostListing(string Uuid, ulong MemoryStoreBytes, ulong DiskMapBytes, ulong CheckpointBytes, ulong OtherBytes, long LastChanged);

/// <summary>Estimate's answer.</summary>
public sealed record TripEstimate(ulong DiskBytes, ulong MemoryBytes, ulong StockDiskBytes, ulong StockMemoryBytes, string Basis);

/// <summary>PrepareMigration's answer.</summary>
public sealed record MigrationUris(string DestinationUri, string MigrateUri, string DisksUri);

/// <summary>One Doctor check.</summary>
public sealed record DoctorCheck(string Name, bool Passed, string Detail);

/// <summary>What the exported object needs from the daemon (plain .NET in, plain .NET out).</summary>
public interface IManagerService
{
    Guests.HookDecision HookEvent(string guest, string operation, string subOperation, string extra, string domainXml);
    IReadOnlyList<KeyValuePair<string, object>> GetStatus(out IReadOnlyList<string> peers);
    IReadOnlyList<GuestListing> ListGuests();
    IReadOnlyList<TripListing> ListTrips();
    /// <summary>What each guest's state occupies on disk, and the retention limits in one line.</summary>
    IReadOnlyList<StoreCostListing> ListStoreCosts(out string limits);
    void Forget(string guest);
    /// <summary>Waits for QEMU (dirty rate) without holding a thread; refuses a second estimate of the same guest while one runs.</summary>
    Task<TripEstimate> EstimateAsync(string guest, string peer);
    MigrationUris PrepareMigration(string guest, string peer);
    IReadOnlyList<DoctorCheck> Doctor();
}

/// <summary>Who may call a method (see <see cref="ManagerApi"/>).</summary>
public enum CallerAccess
{
    /// <summary>Every caller the bus policy lets through (status only).</summary>
    Anyone,

    /// <summary>Root, or a member of <c>daemon:admin_group</c>: methods that reveal guests or make the host work.</summary>
    Admin,

    /// <summary>Root only: methods that change state.</summary>
    Root,
}

/// <summary>
/// <c>org.bfmig.BFMig1.Manager</c> at <c>/org/bfmig/BFMig1</c>, as <c>org.bfmig.BFMig1.xml</c>
/// defines it. The bus policy lets every local user send to it, so each method says here who may
/// call it (<see cref="CallerAccess"/>), checked against the credentials the bus daemon took from
/// the caller's socket (<see cref="CallerCredentials"/>, asked for each call). Every method runs
/// off the connection's receive loop (ManagerApi.Dispatch.cs), so a slow one holds no other call.
/// </summary>
/// <param name="service">The daemon behind the methods.</param>
/// <param name="logger">Refusals and failed methods.</param>
/// <param name="adminGroup">The group of <c>daemon:admin_group</c>; null: the admin methods are root's only.</param>
/// <param name="estimates">How many Estimates a non-root caller may start per window.</param>
/// <param name="refusals">The rate limit of refusal log lines.</param>
public sealed partial class ManagerApi(IManagerService service, ILogger logger, UnixGroup? adminGroup, CallRateLimit estimates, LogRateLimiter refusals)
{
    /// <summary>Estimates a non-root caller may start per minute: each asks QEMU to sample the guest's memory for a second.</summary>
    public const int EstimatesPerMinute = 6;

    public const string BusName = BusContract.BusName;
    public const string ObjectPath = BusContract.ObjectPath;
    public const string InterfaceName = BusContract.Interface;

    /// <summary>
    /// The methods: name, in and out signatures (as in the XML), who may call, and the work. Every
    /// in-argument of the API is a string, so the dispatcher reads them for the method.
    /// </summary>
    private Method[] CreateMethods() =>
    [
        new("HookEvent", "sssss", "bss", CallerAccess.Root, HookEvent),
        new("GetStatus", "", "a{sv}", CallerAccess.Anyone, GetStatus),
        new("ListGuests", "", "a(sssstttx)", CallerAccess.Admin, ListGuests),
        // Like ListGuests: it names every guest (UUID) and peer that travelled (issue 12, finding 10).
        new("ListTrips", "", "a(sssbssx)", CallerAccess.Admin, ListTrips),
        new("ListStoreCosts", "", "a(sttttx)s", CallerAccess.Admin, ListStoreCosts),
        new("Forget", "s", "", CallerAccess.Root, Forget),
        new("Estimate", "ss", "tttts", CallerAccess.Admin, Estimate),
        new("PrepareMigration", "ss", "sss", CallerAccess.Root, PrepareMigration),
        new("Doctor", "", "a(sbs)", CallerAccess.Admin, Doctor),
    ];

    private Task<BodyWriter?> HookEvent(CallerCredentials caller, string[] a)
    {
        // The hook is waiting, and libvirt is waiting for the hook; the decision reads one small local file.
        var d = service.HookEvent(a[0], a[1], a[2], a[3], a[4]);
        return Answer((ref MessageWriter w) =>
        {
            w.WriteBool(d.Allow);
            w.WriteString(d.Message);
            w.WriteString(d.XmlOut);
        });
    }

    private Task<BodyWriter?> GetStatus(CallerCredentials caller, string[] a)
    {
        var status = service.GetStatus(out var peers);
        return Answer((ref MessageWriter w) => Variants.WriteDictionary(ref w, [.. status, new("peers", peers.ToArray())]));
    }

    private Task<BodyWriter?> ListGuests(CallerCredentials caller, string[] a)
    {
        var guests = service.ListGuests();
        return Answer((ref MessageWriter w) =>
        {
            ArrayStart array = w.WriteArrayStart(DBusType.Struct);
            foreach (var g in guests)
            {
                w.WriteStructureStart();
                w.WriteString(g.Uuid);
                w.WriteString(g.Name);
                w.WriteString(g.Location);
                w.WriteString(g.Peer);
                w.WriteUInt64(g.Generation);
                w.WriteUInt64(g.MemoryBytes);
                w.WriteUInt64(g.DiskBytes);
                w.WriteInt64(g.Since);
            }
            w.WriteArrayEnd(array);
        });
    }

    private Task<BodyWriter?> ListTrips(CallerCredentials caller, string[] a)
    {
        var trips = service.ListTrips();
        return Answer((ref MessageWriter w) =>
        {
            ArrayStart array = w.WriteArrayStart(DBusType.Struct);
            foreach (var t in trips)
            {
                w.WriteStructureStart();
                w.WriteString(t.Uuid);
                w.WriteString(t.Direction);
                w.WriteString(t.Path);
                w.WriteBool(t.MemoryOnly);
                w.WriteString(t.Peer);
                w.WriteString(t.Reason);
                w.WriteInt64(t.At);
            }
            w.WriteArrayEnd(array);
        });
    }

    private Task<BodyWriter?> ListStoreCosts(CallerCredentials caller, string[] a)
    {
        var costs = service.ListStoreCosts(out var limits);
        return Answer((ref MessageWriter w) =>
        {
            ArrayStart array = w.WriteArrayStart(DBusType.Struct);
            foreach (var c in costs)
            {
                w.WriteStructureStart();
                w.WriteString(c.Uuid);
                w.WriteUInt64(c.MemoryStoreBytes);
                w.WriteUInt64(c.DiskMapBytes);
                w.WriteUInt64(c.CheckpointBytes);
                w.WriteUInt64(c.OtherBytes);
                w.WriteInt64(c.LastChanged);
            }
            w.WriteArrayEnd(array);
            w.WriteString(limits);
        });
    }

    private Task<BodyWriter?> Forget(CallerCredentials caller, string[] a)
    {
        service.Forget(a[0]);
        return Task.FromResult<BodyWriter?>(null);
    }

    private async Task<BodyWriter?> Estimate(CallerCredentials caller, string[] a)
    {
        // Root is not counted: it could stop the daemon anyway. The one-per-guest rule still holds for it.
        if (caller.Uid != 0 && !estimates.TryTake(caller.Uid, out var retryAfter))
        {
            var seconds = Math.Max(1, (int)Math.Ceiling(retryAfter.TotalSeconds));
            var message = $"Estimate is limited to {estimates.Limit} calls per {(int)estimates.Window.TotalSeconds} s for each user other than root " +
                $"(uid {caller.Uid} used them up); try again in {seconds} s";
            LogRefusal("Estimate", caller.Uid, $"rate limit ({estimates.Limit} per {(int)estimates.Window.TotalSeconds} s)");
            throw new RefusedException(DaemonErrors.LimitExceeded, message);
        }
        var e = await service.EstimateAsync(a[0], a[1]).ConfigureAwait(false);
        return (ref MessageWriter w) =>
        {
            w.WriteUInt64(e.DiskBytes);
            w.WriteUInt64(e.MemoryBytes);
            w.WriteUInt64(e.StockDiskBytes);
            w.WriteUInt64(e.StockMemoryBytes);
            w.WriteString(e.Basis);
        };
    }

    private Task<BodyWriter?> PrepareMigration(CallerCredentials caller, string[] a)
    {
        var u = service.PrepareMigration(a[0], a[1]);
        return Answer((ref MessageWriter w) =>
        {
            w.WriteString(u.DestinationUri);
            w.WriteString(u.MigrateUri);
            w.WriteString(u.DisksUri);
        });
    }

    private Task<BodyWriter?> Doctor(CallerCredentials caller, string[] a)
    {
        var checks = service.Doctor();
        return Answer((ref MessageWriter w) =>
        {
            ArrayStart array = w.WriteArrayStart(DBusType.Struct);
            foreach (var c in checks)
            {
                w.WriteStructureStart();
                w.WriteString(c.Name);
                w.WriteBool(c.Passed);
                w.WriteString(c.Detail);
            }
            w.WriteArrayEnd(array);
        });
    }

    private static Task<BodyWriter?> Answer(BodyWriter write) => Task.FromResult<BodyWriter?>(write);

    /// <summary>
    /// The one access rule of the API: root may call everything, members of the admin group the
    /// <see cref="CallerAccess.Admin"/> methods, everyone the rest. Throws AccessDenied (logged,
    /// rate-limited) with what the caller would need.
    /// </summary>
    private void Require(CallerCredentials caller, string method, CallerAccess access)
    {
        if (access == CallerAccess.Anyone || caller.Uid == 0
            || access == CallerAccess.Admin && adminGroup is { } group && caller.InGroup(group.Gid))
            return;
        var (rule, message) = access == CallerAccess.Root
            ? ("root only", $"{method} changes BFMig state and is allowed to root only (caller uid {caller.Uid}); run it with sudo")
            : adminGroup is { } admins
                ? ($"root or group {admins.Name} only",
                    $"{method} shows this host's guests or makes it work and is allowed to root and to members of group {admins.Name} only " +
                    $"(caller uid {caller.Uid} is not in it); run it with sudo, or ask for membership of {admins.Name} (then log in again)")
                : ("root only (daemon:admin_group not set)",
                    $"{method} shows this host's guests or makes it work and is allowed to root only (caller uid {caller.Uid}; " +
                    "daemon:admin_group is not set in bfmig.conf); run it with sudo");
        LogRefusal(method, caller.Uid, rule);
        throw new RefusedException(DaemonErrors.AccessDenied, message);
    }

    /// <summary>A local user looping on a refused call costs the journal a few lines, not one per call.</summary>
    private void LogRefusal(string method, uint uid, string rule)
    {
        if (!refusals.TryAcquire(out var suppressed))
            return;
        if (suppressed > 0)
            DaemonLog.CallerRefusalsSuppressed(logger, suppressed, refusals.Burst, (int)refusals.Window.TotalSeconds);
        DaemonLog.CallerRefused(logger, method, uid, rule);
    }

    /// <summary>A refusal the caller sees by name; already logged (rate-limited), so not logged again as a failure.</summary>
    private sealed class RefusedException(string errorName, string message) : Exception(message)
    {
        public string ErrorName { get; } = errorName;
    }
}
