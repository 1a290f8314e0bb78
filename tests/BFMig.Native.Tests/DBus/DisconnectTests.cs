using BFMig.Native.DBus;

namespace BFMig.Native.Tests.DBus;

public sealed class DisconnectTests
{
    [Fact]
    public async Task Losing_the_bus_raises_disconnected_and_calls_fail()
    {
        var bus = new PrivateBusFixture();
        using var connection = DBusConnection.Open(bus.Address);
        var lost = new TaskCompletionSource<DBusException>(TaskCreationOptions.RunContinuationsAsynchronously);
        connection.Disconnected += e => lost.TrySetResult(e);
        connection.StartProcessing();
        Assert.True(connection.IsOpen);
        Task<int> pending = connection.CallAsync("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus.Peer", "Ping",
            null, _ => 1, TimeSpan.FromSeconds(10));
        Assert.Equal(1, await pending.WaitAsync(TimeSpan.FromSeconds(10)));

        bus.Dispose(); // kills dbus-daemon
        DBusException why = await lost.Task.WaitAsync(TimeSpan.FromSeconds(10));
        Assert.NotEqual(0, why.Errno);
        Assert.False(connection.IsOpen);
        var e = Assert.Throws<DBusException>(() => connection.Call("org.freedesktop.DBus", "/org/freedesktop/DBus",
            "org.freedesktop.DBus.Peer", "Ping", null, TimeSpan.FromSeconds(2)));
        Assert.NotEqual("", e.ErrorName);
    }

    [Fact]
    public void Opening_an_address_without_a_bus_fails_with_errno()
    {
        var e = Assert.Throws<DBusException>(() => DBusConnection.Open("unix:path=/nonexistent/bfmig/bus"));
        Assert.Equal(2, e.Errno); // ENOENT
        Assert.Contains("connect to unix:path=/nonexistent/bfmig/bus", e.Message);
    }
}
