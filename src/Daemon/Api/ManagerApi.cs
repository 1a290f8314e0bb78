using BFMig.Contracts;
using BFMig.Daemon.Logging;
using BFMig.Native.DBus;
using BFMig.Native.Linux;
using Microsoft.Extensions.Logging;

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
/// the caller's socket. Anything that may block (files, libvirt, network, QEMU) runs off the bus
/// thread with a deferred reply.
/// </summary>
/// <param name="service">The daemon behind the methods.</param>
/// <param name="logger">Refusals and failed methods.</param>
/// <param name="adminGroup">The group of <c>daemon:admin_group</c>; null: the admin methods are root's only.</param>
/// <param name="estimates">How many Estimates a non-root caller may start per window.</param>
/// <param name="refusals">The rate limit of refusal log lines.</param>
public sealed class ManagerApi(IManagerService service, ILogger logger, UnixGroup? adminGroup, CallRateLimit estimates, LogRateLimiter refusals)
{
    /// <summary>Estimates a non-root caller may start per minute: each asks QEMU to sample the guest's memory for a second.</summary>
    public const int EstimatesPerMinute = 6;

    public const string BusName = BusContract.BusName;
    public const string ObjectPath = BusContract.ObjectPath;
    public const string InterfaceName = BusContract.Interface;

    /// <summary>The object to export.</summary>
    public DBusObject CreateObject()
    {
        var obj = new DBusObject(ObjectPath, InterfaceName);
        obj.AddMethod("HookEvent", "sssss", "bss", HookEvent,
            ["guest", "operation", "sub_operation", "extra", "domain_xml"], ["allow", "message", "xml_out"], DBusMethodAccess.Anyone);
        obj.AddMethod("GetStatus", "", "a{sv}", GetStatus, [], ["status"], DBusMethodAccess.Anyone);
        obj.AddMethod("ListGuests", "", "a(sssstttx)", ListGuests, [], ["guests"], DBusMethodAccess.Anyone);
        obj.AddMethod("ListTrips", "", "a(sssbssx)", ListTrips, [], ["trips"], DBusMethodAccess.Anyone);
        obj.AddMethod("Forget", "s", "", Forget, ["guest"], [], DBusMethodAccess.Anyone);
        obj.AddMethod("Estimate", "ss", "tttts", Estimate, ["guest", "peer"],
            ["disk_bytes", "memory_bytes", "stock_disk_bytes", "stock_memory_bytes", "basis"], DBusMethodAccess.Anyone);
        obj.AddMethod("PrepareMigration", "ss", "sss", PrepareMigration, ["guest", "peer"],
            ["destination_uri", "migrate_uri", "disks_uri"], DBusMethodAccess.Anyone);
        obj.AddMethod("Doctor", "", "a(sbs)", Doctor, [], ["checks"], DBusMethodAccess.Anyone);
        obj.AddSignal("TransferProgress", "ssstt", ["guest", "peer", "stream", "bytes_sent", "bytes_saved"]);
        obj.AddSignal("TransferFinished", "ssbs", ["guest", "peer", "ok", "message"]);
        return obj;
    }

    private void HookEvent(DBusMethodCall call)
    {
        Require(call, CallerAccess.Root);
        var r = call.Reader;
        var (guest, op, subop, extra, xml) = (r.ReadString(), r.ReadString(), r.ReadString(), r.ReadString(), r.ReadString());
        // Synchronous on purpose: the hook is waiting, libvirt is waiting for the hook, and the
        // decision reads one small local file.
        var d = service.HookEvent(guest, op, subop, extra, xml);
        call.Reply(w =>
        {
            w.WriteBool(d.Allow);
            w.WriteString(d.Message);
            w.WriteString(d.XmlOut);
        });
    }

    private void GetStatus(DBusMethodCall call)
    {
        var status = service.GetStatus(out var peers);
        call.Reply(w =>
        {
            w.OpenArray("{sv}");
            foreach (var (key, value) in status)
            {
                w.OpenDictEntry("sv");
                w.WriteString(key);
                w.WriteVariant(value);
                w.CloseContainer();
            }
            w.OpenDictEntry("sv");
            w.WriteString("peers");
            w.OpenVariant("as");
            w.WriteStringArray(peers);
            w.CloseContainer();
            w.CloseContainer();
            w.CloseContainer();
        });
    }

    private void ListGuests(DBusMethodCall call)
    {
        Require(call, CallerAccess.Admin);
        Deferred(call, "ListGuests", service.ListGuests, WriteGuests);
    }

    private static void WriteGuests(DBusMessageWriter w, IReadOnlyList<GuestListing> guests)
    {
        w.OpenArray("(sssstttx)");
        foreach (var g in guests)
        {
            w.OpenStruct("sssstttx");
            w.WriteString(g.Uuid);
            w.WriteString(g.Name);
            w.WriteString(g.Location);
            w.WriteString(g.Peer);
            w.WriteUInt64(g.Generation);
            w.WriteUInt64(g.MemoryBytes);
            w.WriteUInt64(g.DiskBytes);
            w.WriteInt64(g.Since);
            w.CloseContainer();
        }
        w.CloseContainer();
    }

    private void ListTrips(DBusMethodCall call)
    {
        // Like ListGuests: it names every guest (UUID) and peer that travelled (issue 12, finding 10).
        Require(call, CallerAccess.Admin);
        Deferred(call, "ListTrips", service.ListTrips, WriteTrips);
    }

    private static void WriteTrips(DBusMessageWriter w, IReadOnlyList<TripListing> trips)
    {
        w.OpenArray("(sssbssx)");
        foreach (var t in trips)
        {
            w.OpenStruct("sssbssx");
            w.WriteString(t.Uuid);
            w.WriteString(t.Direction);
            w.WriteString(t.Path);
            w.WriteBool(t.MemoryOnly);
            w.WriteString(t.Peer);
            w.WriteString(t.Reason);
            w.WriteInt64(t.At);
            w.CloseContainer();
        }
        w.CloseContainer();
    }

    private void Forget(DBusMethodCall call)
    {
        Require(call, CallerAccess.Root);
        var guest = call.Reader.ReadString();
        Deferred(call, "Forget", () =>
        {
            service.Forget(guest);
            return true;
        }, static (_, _) => { });
    }

    private void Estimate(DBusMethodCall call)
    {
        var caller = Require(call, CallerAccess.Admin);
        // Root is not counted: it could stop the daemon anyway. The one-per-guest rule still holds for it.
        if (caller.Uid != 0 && !estimates.TryTake(caller.Uid, out var retryAfter))
        {
            var seconds = Math.Max(1, (int)Math.Ceiling(retryAfter.TotalSeconds));
            var message = $"Estimate is limited to {estimates.Limit} calls per {(int)estimates.Window.TotalSeconds} s for each user other than root " +
                $"(uid {caller.Uid} used them up); try again in {seconds} s";
            LogRefusal("Estimate", caller.Uid, $"rate limit ({estimates.Limit} per {(int)estimates.Window.TotalSeconds} s)");
            throw new DBusException(DaemonErrors.LimitExceeded, message);
        }
        var r = call.Reader;
        var (guest, peer) = (r.ReadString(), r.ReadString());
        DeferredAsync(call, "Estimate", () => service.EstimateAsync(guest, peer), (w, e) =>
        {
            w.WriteUInt64(e.DiskBytes);
            w.WriteUInt64(e.MemoryBytes);
            w.WriteUInt64(e.StockDiskBytes);
            w.WriteUInt64(e.StockMemoryBytes);
            w.WriteString(e.Basis);
        });
    }

    private void PrepareMigration(DBusMethodCall call)
    {
        Require(call, CallerAccess.Root);
        var r = call.Reader;
        var (guest, peer) = (r.ReadString(), r.ReadString());
        Deferred(call, "PrepareMigration", () => service.PrepareMigration(guest, peer), (w, u) =>
        {
            w.WriteString(u.DestinationUri);
            w.WriteString(u.MigrateUri);
            w.WriteString(u.DisksUri);
        });
    }

    private void Doctor(DBusMethodCall call)
    {
        Require(call, CallerAccess.Admin);
        Deferred(call, "Doctor", service.Doctor, WriteChecks);
    }

    private static void WriteChecks(DBusMessageWriter w, IReadOnlyList<DoctorCheck> checks)
    {
        w.OpenArray("(sbs)");
        foreach (var c in checks)
        {
            w.OpenStruct("sbs");
            w.WriteString(c.Name);
            w.WriteBool(c.Passed);
            w.WriteString(c.Detail);
            w.CloseContainer();
        }
        w.CloseContainer();
    }

    /// <summary>
    /// The one access rule of the API: root may call everything, members of the admin group the
    /// <see cref="CallerAccess.Admin"/> methods, everyone the rest. Throws AccessDenied (logged,
    /// rate-limited) with what the caller would need.
    /// </summary>
    private DBusCallerCredentials Require(DBusMethodCall call, CallerAccess access)
    {
        var caller = call.GetSenderCredentials();
        if (access == CallerAccess.Anyone || caller.Uid == 0
            || access == CallerAccess.Admin && adminGroup is { } group && caller.InGroup(group.Gid))
            return caller;
        var method = call.Method.Name;
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
        throw new DBusException(DaemonErrors.AccessDenied, message);
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

    private void Deferred<T>(DBusMethodCall call, string method, Func<T> work, Action<DBusMessageWriter, T> write) =>
        DeferredAsync(call, method, () => Task.FromResult(work()), write);

    /// <summary>
    /// Answers later: <paramref name="work"/> starts on the thread pool (never on the bus thread)
    /// and holds no thread while it awaits.
    /// </summary>
    private void DeferredAsync<T>(DBusMethodCall call, string method, Func<Task<T>> work, Action<DBusMessageWriter, T> write)
    {
        var reply = call.Defer();
        _ = Task.Run(async () =>
        {
            T result;
            try
            {
                result = await work().ConfigureAwait(false);
            }
            catch (DaemonApiException e)
            {
                DaemonLog.MethodFailed(logger, method, e.Message);
                TryReplyError(reply, e.ErrorName, e.Message);
                return;
            }
            catch (Exception e)
            {
                DaemonLog.MethodFailed(logger, method, e.ToString());
                TryReplyError(reply, DaemonErrors.Failed, $"{method} failed: {e.Message}");
                return;
            }
            try
            {
                reply.Reply(w => write(w, result));
            }
            catch (Exception e) when (e is DBusException or ObjectDisposedException)
            {
                // The deferred call is used up even when writing the reply failed: the caller times out.
                DaemonLog.MethodFailed(logger, method, $"cannot send the reply: {e.Message}");
            }
        });
    }

    private void TryReplyError(DBusDeferredReply reply, string name, string message)
    {
        try
        {
            reply.ReplyError(name, message);
        }
        catch (Exception e) when (e is DBusException or ObjectDisposedException)
        {
            DaemonLog.MethodFailed(logger, "reply", e.Message);
        }
    }
}
