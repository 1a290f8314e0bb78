using System.Collections.Concurrent;
using System.Xml.Linq;
using BFMig.Native.DBus;

namespace BFMig.Cli.Tests;

/// <summary>
/// A small stand-in for bfmigd (the real daemon has its own tests): exports
/// org.bfmig.BFMig1.Manager with the signatures read from the checked-in contract, answers with
/// what the test set, records the calls, and emits TransferProgress/TransferFinished when the
/// test (or a fake virsh, through org.bfmig.Test.Kick) asks.
/// </summary>
public sealed class FakeDaemon : IDisposable
{
    public const string BusName = "org.bfmig.BFMig1";
    public const string ObjectPath = "/org/bfmig/BFMig1";
    public const string Interface = "org.bfmig.BFMig1.Manager";
    public const string TestInterface = "org.bfmig.Test";

    private readonly DBusConnection _connection;
    private readonly IDisposable _manager;
    private readonly IDisposable _test;
    private int _disposed;

    public FakeDaemon(string busAddress)
    {
        Contract = ContractMethod.Load();
        _connection = DBusConnection.Open(busAddress);
        var manager = new DBusObject(ObjectPath, Interface);
        foreach (ContractMethod method in Contract.Values.Where(m => !m.IsSignal))
        {
            manager.AddMethod(method.Name, method.InSignature, method.OutSignature, call => Serve(method, call),
                method.InNames, method.OutNames, DBusMethodAccess.Anyone);
        }
        foreach (ContractMethod signal in Contract.Values.Where(m => m.IsSignal))
        {
            manager.AddSignal(signal.Name, signal.OutSignature, signal.OutNames);
        }
        _manager = _connection.Export(manager);
        _test = _connection.Export(new DBusObject(ObjectPath, TestInterface)
            .AddMethod("Kick", "", "", _ => OnKick?.Invoke(this), access: DBusMethodAccess.Anyone));
        _connection.StartProcessing();
        _connection.RequestName(BusName);
    }

    /// <summary>Methods and signals of the contract by name.</summary>
    public IReadOnlyDictionary<string, ContractMethod> Contract { get; }

    /// <summary>Every call as "Member(arg1,arg2)".</summary>
    public ConcurrentQueue<string> Calls { get; } = new();

    public Dictionary<string, object> Status { get; set; } = new()
    {
        ["host_name"] = "hostA",
        ["version"] = "0.1.0",
        ["peers"] = new[] { "hostB", "hostC" },
        ["active_transfers"] = 1u,
        ["uptime_seconds"] = 3725UL,
    };

    public List<FakeGuest> Guests { get; } = [];

    public List<(string Uuid, string Direction, string Path, bool MemoryOnly, string Peer, string Reason, long At)> Trips { get; } = [];

    public (ulong Disk, ulong Memory, ulong StockDisk, ulong StockMemory, string Basis) Estimate { get; set; } =
        (40UL << 20, 12UL << 20, 8UL << 30, 1UL << 30, "rolling dirty bitmap since departure at generation 3; memory from the last trip");

    public (string Destination, string Migrate, string Disks) Uris { get; set; } =
        ("qemu+ssh://hostB/system", "unix:///run/bfmig/hostB/vm1.mig", "unix:///run/bfmig/hostB/vm1.nbd");

    public List<(string Name, bool Passed, string Detail)> Checks { get; } =
    [
        ("hook", true, "/etc/libvirt/hooks/qemu.d/50-bfmig present"),
        ("peer hostB", true, "reachable, authenticated"),
    ];

    /// <summary>When set, every Manager method answers with this D-Bus error.</summary>
    public (string Name, string Message)? Error { get; set; }

    /// <summary>Runs on the bus thread when a fake virsh calls org.bfmig.Test.Kick, before the reply.</summary>
    public Action<FakeDaemon>? OnKick { get; set; }

    public void EmitProgress(string guest, string peer, string stream, ulong sent, ulong saved) =>
        _connection.EmitSignal(ObjectPath, Interface, "TransferProgress", w =>
        {
            w.WriteString(guest);
            w.WriteString(peer);
            w.WriteString(stream);
            w.WriteUInt64(sent);
            w.WriteUInt64(saved);
        });

    public void EmitFinished(string guest, string peer, bool ok, string message) =>
        _connection.EmitSignal(ObjectPath, Interface, "TransferFinished", w =>
        {
            w.WriteString(guest);
            w.WriteString(peer);
            w.WriteBool(ok);
            w.WriteString(message);
        });

    private void Serve(ContractMethod method, DBusMethodCall call)
    {
        DBusMessageReader r = call.Reader;
        var args = new List<string>();
        foreach (char type in method.InSignature)
        {
            args.Add(type == 's' ? r.ReadString() : throw new InvalidOperationException($"fake cannot read '{type}'"));
        }
        Calls.Enqueue($"{method.Name}({string.Join(',', args)})");
        if (Error is { } error)
        {
            call.ReplyError(error.Name, error.Message);
            return;
        }
        switch (method.Name)
        {
            case "GetStatus":
                call.Reply(WriteStatus);
                break;
            case "ListGuests":
                call.Reply(w => WriteGuests(w, method.OutSignature));
                break;
            case "ListTrips":
                call.Reply(w =>
                {
                    w.OpenArray("(sssbssx)");
                    foreach (var t in Trips)
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
                break;
            case "Forget":
                call.Reply();
                break;
            case "Estimate":
                call.Reply(w =>
                {
                    w.WriteUInt64(Estimate.Disk);
                    w.WriteUInt64(Estimate.Memory);
                    w.WriteUInt64(Estimate.StockDisk);
                    w.WriteUInt64(Estimate.StockMemory);
                    w.WriteString(Estimate.Basis);
                });
                break;
            case "PrepareMigration":
                call.Reply(w =>
                {
                    w.WriteString(Uris.Destination);
                    w.WriteString(Uris.Migrate);
                    w.WriteString(Uris.Disks);
                });
                break;
            case "Doctor":
                call.Reply(w =>
                {
                    w.OpenArray("(sbs)");
                    foreach (var (name, passed, detail) in Checks)
                    {
                        w.OpenStruct("sbs");
                        w.WriteString(name);
                        w.WriteBool(passed);
                        w.WriteString(detail);
                        w.CloseContainer();
                    }
                    w.CloseContainer();
                });
                break;
            case "HookEvent":
                call.Reply(w =>
                {
                    w.WriteBool(true);
                    w.WriteString("");
                    w.WriteString("");
                });
                break;
            default:
                call.ReplyError(DBusErrorNames.UnknownMethod, method.Name);
                break;
        }
    }

    private void WriteStatus(DBusMessageWriter w)
    {
        w.OpenArray("{sv}");
        foreach (var (key, value) in Status)
        {
            w.OpenDictEntry("sv");
            w.WriteString(key);
            if (value is string[] strings)
            {
                w.OpenVariant("as");
                w.WriteStringArray(strings);
                w.CloseContainer();
            }
            else
            {
                w.WriteVariant(value);
            }
            w.CloseContainer();
        }
        w.CloseContainer();
    }

    /// <summary>Writes the guests in whichever struct layout the contract declares (see RetainedGuest.ReadArray).</summary>
    private void WriteGuests(DBusMessageWriter w, string signature)
    {
        string element = signature[1..];
        string fields = element[1..^1];
        w.OpenArray(element);
        foreach (FakeGuest g in Guests)
        {
            w.OpenStruct(fields);
            w.WriteString(g.Uuid);
            w.WriteString(g.Name);
            w.WriteString(g.Location);
            w.WriteString(g.Peer);
            w.WriteUInt64(g.Generation);
            if (fields == "sssstttx")
            {
                w.WriteUInt64(g.MemoryBytes);
                w.WriteUInt64(g.DiskBytes);
            }
            else
            {
                w.WriteUInt64(g.MemoryBytes + g.DiskBytes);
            }
            w.WriteInt64(g.SinceUnix);
            w.CloseContainer();
        }
        w.CloseContainer();
    }

    /// <summary>Gives up the name first (synchronously, so the next client already finds it unowned), then closes.</summary>
    public void Dispose()
    {
        if (Interlocked.Exchange(ref _disposed, 1) != 0)
        {
            return;
        }
        _connection.ReleaseName(BusName);
        _test.Dispose();
        _manager.Dispose();
        _connection.Dispose();
    }
}

public sealed record FakeGuest(string Uuid, string Name, string Location, string Peer, ulong Generation, ulong MemoryBytes, ulong DiskBytes, long SinceUnix);

/// <summary>A method or signal of src/Daemon/org.bfmig.BFMig1.xml.</summary>
public sealed record ContractMethod(string Name, bool IsSignal, string InSignature, string OutSignature, string[] InNames, string[] OutNames)
{
    public static IReadOnlyDictionary<string, ContractMethod> Load()
    {
        // Comments are dropped before parsing: the contract's comments quote virsh flags ("--migrateuri"),
        // and "--" inside an XML comment makes the file ill-formed for strict parsers.
        string text = File.ReadAllText(Path.Combine(AppContext.BaseDirectory, "org.bfmig.BFMig1.xml"));
        XDocument contract = XDocument.Parse(System.Text.RegularExpressions.Regex.Replace(text, "<!--.*?-->", "",
            System.Text.RegularExpressions.RegexOptions.Singleline));
        XElement iface = contract.Descendants("interface").Single(i => (string?)i.Attribute("name") == FakeDaemon.Interface);
        var result = new Dictionary<string, ContractMethod>(StringComparer.Ordinal);
        foreach (XElement member in iface.Elements().Where(e => e.Name == "method" || e.Name == "signal"))
        {
            bool signal = member.Name == "signal";
            XElement[] args = [.. member.Elements("arg")];
            XElement[] ins = [.. args.Where(a => !signal && (string?)a.Attribute("direction") == "in")];
            XElement[] outs = [.. args.Where(a => signal || (string?)a.Attribute("direction") == "out")];
            string name = (string)member.Attribute("name")!;
            result[name] = new ContractMethod(name, signal,
                string.Concat(ins.Select(a => (string)a.Attribute("type")!)), string.Concat(outs.Select(a => (string)a.Attribute("type")!)),
                [.. ins.Select(a => (string)a.Attribute("name")!)], [.. outs.Select(a => (string)a.Attribute("name")!)]);
        }
        return result;
    }
}
