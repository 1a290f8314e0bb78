using System.Collections.Concurrent;
using System.Runtime.InteropServices;
using BFMig.Native.DBus;

namespace BFMig.Native.Tests.DBus;

/// <summary>sd-bus bindings against a real private dbus-daemon, called by our bindings and by busctl/dbus-send.</summary>
public sealed class DBusTests : IClassFixture<PrivateBusFixture>, IDisposable
{
    private const string Name = "org.bfmig.Test";
    private const string ObjectPath = "/org/bfmig/Test";
    private const string Iface = "org.bfmig.Test1";
    private static readonly TimeSpan Timeout = TimeSpan.FromSeconds(10);

    private readonly PrivateBusFixture _bus;
    private readonly DBusConnection _server;
    private readonly DBusConnection _client;
    private readonly IDisposable _export;
    private readonly ConcurrentQueue<uint> _seenUids = new();
    private uint _emitted;

    public DBusTests(PrivateBusFixture bus)
    {
        _bus = bus;
        _server = DBusConnection.Open(bus.Address);
        var obj = new DBusObject(ObjectPath, Iface)
            .AddMethod("Echo", "sibtd", "sibtd", Echo, ["text", "number", "flag", "big", "ratio"], ["text", "number", "flag", "big", "ratio"])
            .AddMethod("Sum", "au", "t", call =>
            {
                var r = call.Reader;
                ulong total = 0;
                if (r.EnterArray("u"))
                {
                    while (!r.AtEnd)
                    {
                        total += r.ReadUInt32();
                    }
                    r.ExitContainer();
                }
                call.Reply(w => w.WriteUInt64(total));
            }, ["values"], ["total"])
            .AddMethod("Describe", "a{sv}", "a{ss}", call =>
            {
                Dictionary<string, object> props = call.Reader.ReadVariantDictionary();
                call.Reply(w => w.WriteStringDictionary(props.Select(p =>
                    KeyValuePair.Create(p.Key, $"{p.Value.GetType().Name}:{(p.Value is string[] a ? string.Join(",", a) : p.Value)}"))));
            }, ["props"], ["described"])
            .AddMethod("Swap", "(su)", "(us)", call =>
            {
                var r = call.Reader;
                r.EnterStruct("su");
                string s = r.ReadString();
                uint u = r.ReadUInt32();
                r.ExitContainer();
                call.Reply(w =>
                {
                    w.OpenStruct("us");
                    w.WriteUInt32(u);
                    w.WriteString(s);
                    w.CloseContainer();
                });
            }, ["pair"], ["swapped"])
            .AddMethod("WhoAmI", "", "u", call =>
            {
                uint uid = call.GetSenderUid();
                _seenUids.Enqueue(uid);
                call.Reply(w => w.WriteUInt32(uid));
            }, [], ["uid"], DBusMethodAccess.Anyone)
            .AddMethod("RootOnly", "", "", call =>
            {
                if (call.GetSenderUid() != 0)
                {
                    throw new DBusException(DBusErrorNames.AccessDenied, "RootOnly changes state: root only");
                }
            }, access: DBusMethodAccess.Anyone)
            .AddMethod("Fail", "ss", "", call =>
            {
                var r = call.Reader;
                call.ReplyError(r.ReadString(), r.ReadString());
            }, ["name", "message"])
            .AddMethod("Throws", "", "", _ => throw new InvalidOperationException("boom from the handler"))
            .AddMethod("Later", "u", "s", call =>
            {
                uint delayMs = call.Reader.ReadUInt32();
                DBusDeferredReply reply = call.Defer();
                _ = Task.Run(async () =>
                {
                    await Task.Delay((int)delayMs);
                    reply.Reply(w => w.WriteString($"answered after {delayMs} ms"));
                });
            }, ["delayMs"], ["text"])
            .AddMethod("Never", "", "", call => call.Defer())
            .AddMethod("ReplyThrows", "", "s", call => call.Reply(_ => throw new InvalidOperationException("no value to write")), [], ["text"])
            .AddMethod("LaterThrows", "", "s", call =>
            {
                DBusDeferredReply reply = call.Defer();
                _ = Task.Run(() =>
                {
                    try
                    {
                        reply.Reply(_ => throw new InvalidOperationException("no value to write later"));
                    }
                    catch (InvalidOperationException)
                    {
                        // Expected: the writer's failure reaches the replying code too.
                    }
                });
            }, [], ["text"])
            .AddMethod("Emit", "s", "", call =>
            {
                string payload = call.Reader.ReadString();
                uint count = Interlocked.Increment(ref _emitted);
                _server!.EmitSignal(ObjectPath, Iface, "Happened", w =>
                {
                    w.WriteString(payload);
                    w.WriteUInt32(count);
                });
            }, ["payload"])
            .AddSignal("Happened", "su", ["payload", "count"]);
        _export = _server.Export(obj);
        _server.RequestName(Name);
        _server.StartProcessing();
        _client = DBusConnection.Open(bus.Address);
        _client.StartProcessing();
    }

    private static void Echo(DBusMethodCall call)
    {
        var r = call.Reader;
        string text = r.ReadString();
        int number = r.ReadInt32();
        bool flag = r.ReadBool();
        ulong big = r.ReadUInt64();
        double ratio = r.ReadDouble();
        call.Reply(w =>
        {
            w.WriteString(text);
            w.WriteInt32(number);
            w.WriteBool(flag);
            w.WriteUInt64(big);
            w.WriteDouble(ratio);
        });
    }

    private (string, int, bool, ulong, double) CallEcho(string text, int number, bool flag, ulong big, double ratio) =>
        _client.Call(Name, ObjectPath, Iface, "Echo", w =>
        {
            w.WriteString(text);
            w.WriteInt32(number);
            w.WriteBool(flag);
            w.WriteUInt64(big);
            w.WriteDouble(ratio);
        }, r => (r.ReadString(), r.ReadInt32(), r.ReadBool(), r.ReadUInt64(), r.ReadDouble()), Timeout);

    [Fact]
    public void Basic_types_round_trip_between_two_of_our_connections()
    {
        Assert.Equal(("grüße ✓", -42, true, ulong.MaxValue - 1, 0.125), CallEcho("grüße ✓", -42, true, ulong.MaxValue - 1, 0.125));
        Assert.Equal(("", int.MinValue, false, 0UL, -1e300), CallEcho("", int.MinValue, false, 0UL, -1e300));
        string longText = new('x', 100_000);
        Assert.Equal(longText, CallEcho(longText, 1, true, 1, 1).Item1);
    }

    [Fact]
    public void Arrays_structs_dictionaries_and_variants_round_trip()
    {
        ulong sum = _client.Call(Name, ObjectPath, Iface, "Sum", w =>
        {
            w.OpenArray("u");
            foreach (uint v in new uint[] { 1, 2, uint.MaxValue })
            {
                w.WriteUInt32(v);
            }
            w.CloseContainer();
        }, r => r.ReadUInt64(), Timeout);
        Assert.Equal(3UL + uint.MaxValue, sum);

        ulong empty = _client.Call(Name, ObjectPath, Iface, "Sum", w => { w.OpenArray("u"); w.CloseContainer(); }, r => r.ReadUInt64(), Timeout);
        Assert.Equal(0UL, empty);

        Dictionary<string, string> described = _client.Call(Name, ObjectPath, Iface, "Describe", w => w.WriteVariantDictionary(
        [
            KeyValuePair.Create<string, object>("name", "guest1"),
            KeyValuePair.Create<string, object>("bytes", 1UL << 40),
            KeyValuePair.Create<string, object>("ok", true),
            KeyValuePair.Create<string, object>("delta", -7),
        ]), r => r.ReadStringDictionary(), Timeout);
        Assert.Equal(new Dictionary<string, string>
        {
            ["name"] = "String:guest1",
            ["bytes"] = "UInt64:1099511627776",
            ["ok"] = "Boolean:True",
            ["delta"] = "Int32:-7",
        }, described);

        (uint, string) swapped = _client.Call(Name, ObjectPath, Iface, "Swap", w =>
        {
            w.OpenStruct("su");
            w.WriteString("left");
            w.WriteUInt32(7);
            w.CloseContainer();
        }, r =>
        {
            r.EnterStruct("us");
            var result = (r.ReadUInt32(), r.ReadString());
            r.ExitContainer();
            return result;
        }, Timeout);
        Assert.Equal((7u, "left"), swapped);
    }

    [Fact]
    public void Error_replies_carry_name_and_message()
    {
        var e = Assert.Throws<DBusException>(() => _client.Call(Name, ObjectPath, Iface, "Fail", w =>
        {
            w.WriteString("org.bfmig.Error.SplitBrain");
            w.WriteString("guest runs on hostB since 12:00");
        }, Timeout));
        Assert.Equal("org.bfmig.Error.SplitBrain", e.ErrorName);
        Assert.Equal("guest runs on hostB since 12:00", e.ErrorMessage);
        Assert.Equal(0, e.Errno);

        e = Assert.Throws<DBusException>(() => _client.Call(Name, ObjectPath, Iface, "Throws", null, Timeout));
        Assert.Equal(DBusErrorNames.Failed, e.ErrorName);
        Assert.Equal("boom from the handler", e.ErrorMessage);

        // Wrong argument types are refused by sd-bus against the vtable signature, before our handler.
        e = Assert.Throws<DBusException>(() => _client.Call(Name, ObjectPath, Iface, "Sum", w => w.WriteString("x"), Timeout));
        Assert.Equal(DBusErrorNames.InvalidArgs, e.ErrorName);

        e = Assert.Throws<DBusException>(() => _client.Call(Name, ObjectPath, Iface, "NoSuchMethod", null, Timeout));
        Assert.Equal(DBusErrorNames.UnknownMethod, e.ErrorName);

        e = Assert.Throws<DBusException>(() => _client.Call("org.bfmig.Nobody", ObjectPath, Iface, "Echo", null, Timeout));
        Assert.Equal(DBusErrorNames.ServiceUnknown, e.ErrorName);
    }

    [Fact]
    public async Task Deferred_replies_and_async_calls_complete()
    {
        Task<string> slow = _client.CallAsync(Name, ObjectPath, Iface, "Later", w => w.WriteUInt32(200), r => r.ReadString(), Timeout);
        Task<string> fast = _client.CallAsync(Name, ObjectPath, Iface, "Later", w => w.WriteUInt32(1), r => r.ReadString(), Timeout);
        Assert.Equal("answered after 1 ms", await fast.WaitAsync(Timeout));
        Assert.Equal("answered after 200 ms", await slow.WaitAsync(Timeout));

        // The sync path works while the processing thread runs.
        Assert.Equal("answered after 5 ms",
            _client.Call(Name, ObjectPath, Iface, "Later", w => w.WriteUInt32(5), r => r.ReadString(), Timeout));
    }

    [Fact]
    public async Task A_reply_writer_that_throws_answers_with_an_error_instead_of_silence()
    {
        // Well inside the timeout: a missing reply would show up as NoReply after 10 s.
        var e = Assert.Throws<DBusException>(() => _client.Call(Name, ObjectPath, Iface, "ReplyThrows", null, Timeout));
        Assert.Equal(DBusErrorNames.Failed, e.ErrorName);
        Assert.Contains("no value to write", e.ErrorMessage);

        var deferred = await Assert.ThrowsAsync<DBusException>(() =>
            _client.CallAsync(Name, ObjectPath, Iface, "LaterThrows", null, r => r.ReadString(), Timeout).WaitAsync(Timeout));
        Assert.Equal(DBusErrorNames.Failed, deferred.ErrorName);
        Assert.Contains("no value to write later", deferred.ErrorMessage);
    }

    [Fact]
    public async Task Calls_time_out_when_nobody_answers()
    {
        var started = DateTime.UtcNow;
        var e = Assert.Throws<DBusException>(() => _client.Call(Name, ObjectPath, Iface, "Never", null, TimeSpan.FromMilliseconds(300)));
        Assert.Contains(e.ErrorName, new[] { DBusErrorNames.NoReply, DBusErrorNames.Timeout, "System.Error.110" });
        Assert.InRange(DateTime.UtcNow - started, TimeSpan.FromMilliseconds(250), TimeSpan.FromSeconds(5));

        var asyncError = await Assert.ThrowsAsync<DBusException>(() =>
            _client.CallAsync(Name, ObjectPath, Iface, "Never", null, r => 0, TimeSpan.FromMilliseconds(300)).WaitAsync(Timeout));
        Assert.Contains(asyncError.ErrorName, new[] { DBusErrorNames.NoReply, DBusErrorNames.Timeout });
    }

    [Fact]
    public async Task Signals_reach_a_subscriber()
    {
        var received = new TaskCompletionSource<(string, uint, string)>(TaskCreationOptions.RunContinuationsAsynchronously);
        using var subscription = _client.SubscribeSignal(null, ObjectPath, Iface, "Happened", s =>
        {
            var r = s.Reader;
            string payload = r.ReadString();
            uint count = r.ReadUInt32();
            if (payload == "ping")
            {
                received.TrySetResult((payload, count, s.Member));
            }
        });
        _client.Call(Name, ObjectPath, Iface, "Emit", w => w.WriteString("ping"), Timeout);
        var (payload, count, member) = await received.Task.WaitAsync(Timeout);
        Assert.Equal("ping", payload);
        Assert.True(count >= 1);
        Assert.Equal("Happened", member);
    }

    [Fact]
    public void Caller_uid_is_reported_for_root_and_for_an_unprivileged_caller()
    {
        uint mine = _client.Call(Name, ObjectPath, Iface, "WhoAmI", null, r => r.ReadUInt32(), Timeout);
        Assert.Equal(geteuid(), mine);
        _client.Call(Name, ObjectPath, Iface, "RootOnly", null, Timeout);

        // An independent client running as nobody (65534).
        var (code, stdout, stderr) = PrivateBusFixture.Run("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
            "busctl", "--address=" + _bus.Address, "call", Name, ObjectPath, Iface, "WhoAmI");
        Assert.True(code == 0, stderr);
        Assert.Equal("u 65534", stdout.Trim());
        Assert.Contains(65534u, _seenUids);

        // dbus-send, because busctl replaces every AccessDenied message with "Access denied".
        (code, _, stderr) = PrivateBusFixture.Run("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
            "dbus-send", "--bus=" + _bus.Address, "--print-reply", "--dest=" + Name, ObjectPath, Iface + ".RootOnly");
        Assert.NotEqual(0, code);
        Assert.Contains("org.freedesktop.DBus.Error.AccessDenied: RootOnly changes state: root only", stderr);

        // Without DBusMethodAccess.Anyone, sd-bus itself refuses other uids before the handler runs.
        (code, _, stderr) = PrivateBusFixture.Run("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
            "dbus-send", "--bus=" + _bus.Address, "--print-reply", "--dest=" + Name, ObjectPath, Iface + ".Sum", "array:uint32:1");
        Assert.NotEqual(0, code);
        Assert.Contains("Access to org.bfmig.Test1.Sum() not permitted", stderr);
    }

    [Fact]
    public void Busctl_and_dbus_send_see_the_exported_object()
    {
        // Introspection is generated by sd-bus from our native vtable: names and signatures prove its layout.
        var (code, stdout, stderr) = PrivateBusFixture.Run("busctl", "--address=" + _bus.Address, "introspect", Name, ObjectPath, Iface);
        Assert.True(code == 0, stderr);
        Assert.Matches(@"\.Echo\s+method\s+sibtd\s+sibtd", stdout);
        Assert.Matches(@"\.Describe\s+method\s+a\{sv\}\s+a\{ss\}", stdout);
        Assert.Matches(@"\.Happened\s+signal\s+su\s+-", stdout);

        (code, stdout, stderr) = PrivateBusFixture.Run("busctl", "--address=" + _bus.Address, "call", "--", Name, ObjectPath, Iface,
            "Echo", "sibtd", "hello world", "-5", "true", "18446744073709551615", "2.5");
        Assert.True(code == 0, stderr);
        Assert.Equal("sibtd \"hello world\" -5 true 18446744073709551615 2.5", stdout.Trim());

        (code, stdout, stderr) = PrivateBusFixture.Run("dbus-send", "--bus=" + _bus.Address, "--print-reply", "--dest=" + Name,
            ObjectPath, Iface + ".Swap", "string:x"); // wrong signature on purpose
        Assert.NotEqual(0, code);
        Assert.True(stderr.Contains("InvalidArgs"), stderr);

        (code, stdout, stderr) = PrivateBusFixture.Run("dbus-send", "--bus=" + _bus.Address, "--print-reply", "--dest=" + Name,
            ObjectPath, Iface + ".Sum", "array:uint32:10,20,30");
        Assert.True(code == 0, stderr);
        Assert.Contains("uint64 60", stdout);

        // Argument names reach the introspection XML (the names field of the vtable).
        (code, stdout, stderr) = PrivateBusFixture.Run("dbus-send", "--bus=" + _bus.Address, "--print-reply", "--dest=" + Name,
            ObjectPath, "org.freedesktop.DBus.Introspectable.Introspect");
        Assert.True(code == 0, stderr);
        Assert.Contains("<arg type=\"u\" name=\"delayMs\" direction=\"in\"/>", stdout);
        Assert.Contains("<arg type=\"s\" name=\"text\" direction=\"out\"/>", stdout);
        Assert.Contains("<arg type=\"u\" name=\"count\"/>", stdout);
    }

    [Fact]
    public void A_taken_name_is_refused_and_the_unique_name_is_known()
    {
        using var other = DBusConnection.Open(_bus.Address);
        Assert.StartsWith(":", other.UniqueName);
        var e = Assert.Throws<DBusException>(() => other.RequestName(Name));
        Assert.Equal(17, e.Errno); // EEXIST
        other.RequestName("org.bfmig.Other");
        other.ReleaseName("org.bfmig.Other");
    }

    [Fact]
    public void Disposed_export_disappears_from_the_bus()
    {
        using var server = DBusConnection.Open(_bus.Address);
        server.StartProcessing();
        string unique = server.UniqueName;
        var export = server.Export(new DBusObject("/tmp/obj", "org.bfmig.Temp").AddMethod("Ping", "", "s", c => c.Reply(w => w.WriteString("pong")), [], ["r"]));
        Assert.Equal("pong", _client.Call(unique, "/tmp/obj", "org.bfmig.Temp", "Ping", null, r => r.ReadString(), Timeout));
        export.Dispose();
        var e = Assert.Throws<DBusException>(() => _client.Call(unique, "/tmp/obj", "org.bfmig.Temp", "Ping", null, r => r.ReadString(), Timeout));
        Assert.Contains(e.ErrorName, new[] { DBusErrorNames.UnknownMethod, "org.freedesktop.DBus.Error.UnknownObject" });
    }

    [Fact]
    public void Pending_async_call_fails_when_the_connection_is_disposed()
    {
        var client = DBusConnection.Open(_bus.Address);
        client.StartProcessing();
        Task<int> never = client.CallAsync(Name, ObjectPath, Iface, "Never", null, r => 0, Timeout);
        client.Dispose();
        var e = Assert.Throws<AggregateException>(() => never.Wait(Timeout));
        Assert.IsType<ObjectDisposedException>(e.InnerException);
        Assert.Throws<ObjectDisposedException>(() => client.Call(Name, ObjectPath, Iface, "Echo", null, Timeout));
    }

    [DllImport("libc")]
#pragma warning disable SYSLIB1054 // test-only helper
    private static extern uint geteuid();
#pragma warning restore SYSLIB1054

    public void Dispose()
    {
        // Synchronously, so the next test's RequestName cannot race the bus noticing our disconnect.
        _server.ReleaseName(Name);
        _export.Dispose();
        _client.Dispose();
        _server.Dispose();
    }
}
