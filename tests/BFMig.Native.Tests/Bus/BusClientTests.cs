using System.Diagnostics;
using BFMig.Bus;
using BFMig.Native.Tests.DBus;
using BFMig.Tests.Shared;
using Tmds.DBus.Protocol;

namespace BFMig.Native.Tests.Bus;

/// <summary>What bfmig's clients rely on from src/Bus, against a real private dbus-daemon.</summary>
public sealed class BusClientTests(PrivateBusFixture bus) : IClassFixture<PrivateBusFixture>
{
    [Fact]
    public void A_call_nobody_answers_ends_at_its_deadline()
    {
        using var server = TestBus.Open(bus.Address);
        server.Connection.AddMethodHandler(new TestObject("/silent", call =>
        {
            call.DisposesAsynchronously = true; // kept, never answered
            return true;
        }));
        using var client = TestBus.Open(bus.Address);
        var watch = Stopwatch.StartNew();
        var e = Assert.Throws<TimeoutException>(() => client.Call(server.Connection.UniqueName!, "/silent", "org.bfmig.Test", "Wait", "", null,
            static (_, _) => 0, TimeSpan.FromMilliseconds(300)));
        Assert.InRange(watch.Elapsed, TimeSpan.FromMilliseconds(250), TimeSpan.FromSeconds(5));
        Assert.Contains("org.bfmig.Test.Wait", e.Message);
    }

    [Fact]
    public void An_error_reply_keeps_its_name_and_message()
    {
        using var server = TestBus.Open(bus.Address);
        server.Connection.AddMethodHandler(new TestObject("/failing", call =>
        {
            call.ReplyError("org.bfmig.BFMig1.Error.Busy", "busy right now");
            return true;
        }));
        using var client = TestBus.Open(bus.Address);
        var e = Assert.Throws<DBusErrorReplyException>(() => client.Call(server.Connection.UniqueName!, "/failing", "org.bfmig.Test", "Any", "", null,
            static (_, _) => 0, TestBus.Timeout));
        Assert.Equal(("org.bfmig.BFMig1.Error.Busy", "busy right now"), (e.ErrorName, e.ErrorMessage));
    }

    [Fact]
    public void A_bus_address_where_nothing_listens_is_named_in_the_failure()
    {
        var e = Assert.Throws<DBusConnectFailedException>(() => BusClient.Connect("unix:path=/nonexistent/bfmig/bus", TimeSpan.FromSeconds(5)));
        Assert.Equal("/nonexistent/bfmig/bus: No such file or directory", e.Message);
    }

    [Fact]
    public async Task The_bus_reports_the_callers_uid_and_groups()
    {
        using var client = TestBus.Open(bus.Address);
        using var other = TestBus.Open(bus.Address);
        CallerCredentials caller = await CallerCredentials.QueryAsync(client.Connection, other.Connection.UniqueName!);
        Assert.Equal(0u, caller.Uid); // the tests run as root
        Assert.True(caller.InGroup(0), string.Join(",", caller.GroupIds));
        // An unknown sender is an error from the bus, never a default identity.
        await Assert.ThrowsAsync<DBusErrorReplyException>(() => CallerCredentials.QueryAsync(client.Connection, ":1.99999"));
    }

    [Fact]
    public void Variants_of_the_status_dictionary_round_trip()
    {
        var values = new Dictionary<string, object>
        {
            ["s"] = "text", ["b"] = true, ["u"] = 7u, ["t"] = 1UL << 40, ["i"] = -3, ["x"] = -4L, ["as"] = new[] { "a", "b" },
        };
        using var server = TestBus.Open(bus.Address);
        server.Connection.AddMethodHandler(new TestObject("/status", call =>
        {
            call.Reply("a{sv}", (ref MessageWriter w) => Variants.WriteDictionary(ref w, values));
            return true;
        }));
        using var client = TestBus.Open(bus.Address);
        var read = client.Call(server.Connection.UniqueName!, "/status", "org.bfmig.Test", "Get", "", null, static (m, _) =>
        {
            var r = m.GetBodyReader();
            return Variants.ReadDictionary(ref r);
        }, TestBus.Timeout);
        Assert.Equal(values.Keys.Order(), read.Keys.Order());
        foreach (var (key, value) in values)
            Assert.Equal(value, read[key]);
    }
}
