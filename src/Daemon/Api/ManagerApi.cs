using BFMig.Daemon.Logging;
using BFMig.Native.DBus;
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
    TripEstimate Estimate(string guest, string peer);
    MigrationUris PrepareMigration(string guest, string peer);
    IReadOnlyList<DoctorCheck> Doctor();
}

/// <summary>
/// <c>org.bfmig.BFMig1.Manager</c> at <c>/org/bfmig/BFMig1</c>, as <c>org.bfmig.BFMig1.xml</c>
/// defines it. Every method is open to every caller the bus policy lets through; the methods
/// that change state check here that the caller is root. Anything that may block (files,
/// libvirt, network) runs off the bus thread with a deferred reply.
/// </summary>
public sealed class ManagerApi(IManagerService service, ILogger logger)
{
    public const string BusName = "org.bfmig.BFMig1";
    public const string ObjectPath = "/org/bfmig/BFMig1";
    public const string InterfaceName = "org.bfmig.BFMig1.Manager";

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
        RequireRoot(call);
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

    private void ListGuests(DBusMethodCall call) => Deferred(call, "ListGuests", service.ListGuests, (w, guests) =>
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
    });

    private void ListTrips(DBusMethodCall call) => Deferred(call, "ListTrips", service.ListTrips, (w, trips) =>
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
    });

    private void Forget(DBusMethodCall call)
    {
        RequireRoot(call);
        var guest = call.Reader.ReadString();
        Deferred(call, "Forget", () =>
        {
            service.Forget(guest);
            return true;
        }, static (_, _) => { });
    }

    private void Estimate(DBusMethodCall call)
    {
        var r = call.Reader;
        var (guest, peer) = (r.ReadString(), r.ReadString());
        Deferred(call, "Estimate", () => service.Estimate(guest, peer), (w, e) =>
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
        RequireRoot(call);
        var r = call.Reader;
        var (guest, peer) = (r.ReadString(), r.ReadString());
        Deferred(call, "PrepareMigration", () => service.PrepareMigration(guest, peer), (w, u) =>
        {
            w.WriteString(u.DestinationUri);
            w.WriteString(u.MigrateUri);
            w.WriteString(u.DisksUri);
        });
    }

    private void Doctor(DBusMethodCall call) => Deferred(call, "Doctor", service.Doctor, (w, checks) =>
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
    });

    private void RequireRoot(DBusMethodCall call)
    {
        var uid = call.GetSenderUid();
        if (uid == 0)
            return;
        DaemonLog.AccessDenied(logger, call.Method.Name, uid);
        throw new DBusException(DaemonErrors.AccessDenied,
            $"{call.Method.Name} changes BFMig state and is allowed to root only (caller uid {uid}); run it with sudo");
    }

    private void Deferred<T>(DBusMethodCall call, string method, Func<T> work, Action<DBusMessageWriter, T> write)
    {
        var reply = call.Defer();
        _ = Task.Run(() =>
        {
            T result;
            try
            {
                result = work();
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
