using System.Collections.Concurrent;
using System.Xml.Linq;
using BFMig.Bus;
using BFMig.Tests.Shared;
using Tmds.DBus.Protocol;

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

    private readonly BusClient _connection;
    private int _disposed;

    public FakeDaemon(string busAddress)
    {
        Contract = ContractMethod.Load();
        _connection = TestBus.Open(busAddress);
        _connection.Connection.AddMethodHandler(new TestObject(ObjectPath, Serve));
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

    /// <summary>ListStoreCosts' answer; with <see cref="RetentionLimits"/> null the fake answers UnknownMethod (a daemon older than the method).</summary>
    public List<(string Uuid, ulong MemoryStore, ulong DiskMaps, ulong Checkpoints, ulong Other, long LastChanged)> Costs { get; } = [];

    public string? RetentionLimits { get; set; }

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
        _connection.Emit("TransferProgress", "ssstt", (ref MessageWriter w) =>
        {
            w.WriteString(guest);
            w.WriteString(peer);
            w.WriteString(stream);
            w.WriteUInt64(sent);
            w.WriteUInt64(saved);
        });

    public void EmitFinished(string guest, string peer, bool ok, string message) =>
        _connection.Emit("TransferFinished", "ssbs", (ref MessageWriter w) =>
        {
            w.WriteString(guest);
            w.WriteString(peer);
            w.WriteBool(ok);
            w.WriteString(message);
        });

    /// <summary>Answers a Manager method from the contract, or org.bfmig.Test.Kick; false for anything else.</summary>
    private bool Serve(MethodContext call)
    {
        if (call.IsDBusIntrospectRequest)
        {
            call.ReplyIntrospectXml([ContractMethod.InterfaceXml()]);
            return true;
        }
        Message request = call.Request;
        if (request.InterfaceAsString == TestInterface && request.MemberAsString == "Kick")
        {
            OnKick?.Invoke(this);
            call.Reply("");
            return true;
        }
        if (request.InterfaceAsString != Interface || request.MemberAsString is not { } member
            || !Contract.TryGetValue(member, out ContractMethod? method) || method.IsSignal)
        {
            return false;
        }
        if ((request.SignatureAsString ?? "") != method.InSignature)
        {
            call.ReplyError(BusErrorNames.InvalidArgs, $"{member} takes ({method.InSignature})");
            return true;
        }
        Reader r = request.GetBodyReader();
        var args = new List<string>();
        foreach (char type in method.InSignature)
        {
            args.Add(type == 's' ? r.ReadString() : throw new InvalidOperationException($"fake cannot read '{type}'"));
        }
        Calls.Enqueue($"{method.Name}({string.Join(',', args)})");
        if (Error is { } error)
        {
            call.ReplyError(error.Name, error.Message);
            return true;
        }
        string outSignature = method.OutSignature;
        switch (method.Name)
        {
            case "GetStatus":
                call.Reply(outSignature, (ref MessageWriter w) => Variants.WriteDictionary(ref w, Status));
                break;
            case "ListGuests":
                call.Reply(outSignature, (ref MessageWriter w) => WriteGuests(ref w, outSignature));
                break;
            case "ListTrips":
                call.Reply(outSignature, (ref MessageWriter w) =>
                {
                    ArrayStart array = w.WriteArrayStart(DBusType.Struct);
                    foreach (var t in Trips)
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
                break;
            case "ListStoreCosts" when RetentionLimits is { } limits:
                call.Reply(outSignature, (ref MessageWriter w) =>
                {
                    ArrayStart array = w.WriteArrayStart(DBusType.Struct);
                    foreach (var c in Costs)
                    {
                        w.WriteStructureStart();
                        w.WriteString(c.Uuid);
                        w.WriteUInt64(c.MemoryStore);
                        w.WriteUInt64(c.DiskMaps);
                        w.WriteUInt64(c.Checkpoints);
                        w.WriteUInt64(c.Other);
                        w.WriteInt64(c.LastChanged);
                    }
                    w.WriteArrayEnd(array);
                    w.WriteString(limits);
                });
                break;
            case "Forget":
                call.Reply(outSignature);
                break;
            case "Estimate":
                call.Reply(outSignature, (ref MessageWriter w) =>
                {
                    w.WriteUInt64(Estimate.Disk);
                    w.WriteUInt64(Estimate.Memory);
                    w.WriteUInt64(Estimate.StockDisk);
                    w.WriteUInt64(Estimate.StockMemory);
                    w.WriteString(Estimate.Basis);
                });
                break;
            case "PrepareMigration":
                call.Reply(outSignature, (ref MessageWriter w) =>
                {
                    w.WriteString(Uris.Destination);
                    w.WriteString(Uris.Migrate);
                    w.WriteString(Uris.Disks);
                });
                break;
            case "Doctor":
                call.Reply(outSignature, (ref MessageWriter w) =>
                {
                    ArrayStart array = w.WriteArrayStart(DBusType.Struct);
                    foreach (var (name, passed, detail) in Checks)
                    {
                        w.WriteStructureStart();
                        w.WriteString(name);
                        w.WriteBool(passed);
                        w.WriteString(detail);
                    }
                    w.WriteArrayEnd(array);
                });
                break;
            case "HookEvent":
                call.Reply(outSignature, (ref MessageWriter w) =>
                {
                    w.WriteBool(true);
                    w.WriteString("");
                    w.WriteString("");
                });
                break;
            default:
                call.ReplyError(BusErrorNames.UnknownMethod, method.Name);
                break;
        }
        return true;
    }

    /// <summary>Writes the guests in whichever struct layout the contract declares (see RetainedGuest.ReadArray).</summary>
    private void WriteGuests(ref MessageWriter w, string signature)
    {
        string fields = signature[2..^1];
        ArrayStart array = w.WriteArrayStart(DBusType.Struct);
        foreach (FakeGuest g in Guests)
        {
            w.WriteStructureStart();
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
        }
        w.WriteArrayEnd(array);
    }

    /// <summary>Gives up the name first (synchronously, so the next client already finds it unowned), then closes.</summary>
    public void Dispose()
    {
        if (Interlocked.Exchange(ref _disposed, 1) != 0)
        {
            return;
        }
        _connection.Connection.ReleaseNameAsync(BusName).Wait(TestBus.Timeout);
        _connection.Dispose();
    }
}

public sealed record FakeGuest(string Uuid, string Name, string Location, string Peer, ulong Generation, ulong MemoryBytes, ulong DiskBytes, long SinceUnix);

/// <summary>A method or signal of src/Daemon/org.bfmig.BFMig1.xml.</summary>
public sealed record ContractMethod(string Name, bool IsSignal, string InSignature, string OutSignature, string[] InNames, string[] OutNames)
{
    /// <summary>The Manager interface element of the contract, as the fake's introspection data.</summary>
    public static ReadOnlyMemory<byte> InterfaceXml()
    {
        string text = System.Text.RegularExpressions.Regex.Replace(File.ReadAllText(Path.Combine(AppContext.BaseDirectory, "org.bfmig.BFMig1.xml")),
            "<!--.*?-->", "", System.Text.RegularExpressions.RegexOptions.Singleline);
        int start = text.IndexOf("<interface ", StringComparison.Ordinal);
        int end = text.IndexOf("</interface>", start, StringComparison.Ordinal) + "</interface>".Length;
        return System.Text.Encoding.UTF8.GetBytes(text[start..end]);
    }

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
