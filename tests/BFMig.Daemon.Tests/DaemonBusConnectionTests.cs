using BFMig.Daemon.Api;
using BFMig.Daemon.Logging;
using BFMig.Daemon.Tests.Infrastructure;
using BFMig.Tests.Shared;
using Microsoft.Extensions.Logging.Abstractions;
using Tmds.DBus.Protocol;

namespace BFMig.Daemon.Tests;

/// <summary>bfmigd's own bus connection: the name is exclusive, and losing the bus is reported once.</summary>
public sealed class DaemonBusConnectionTests
{
    private static ManagerApi Api() => new(null!, NullLogger.Instance, null,
        new CallRateLimit(1, TimeSpan.FromMinutes(1), TimeProvider.System), new LogRateLimiter(1, TimeSpan.FromSeconds(1), TimeProvider.System));

    [Fact]
    public async Task Losing_the_bus_is_reported_and_the_name_is_not_shared()
    {
        var bus = new PrivateBus();
        var lost = new TaskCompletionSource<string>(TaskCreationOptions.RunContinuationsAsynchronously);
        using var daemon = DaemonBus.Open(bus.Address, Api(), NullLogger.Instance, reason => lost.TrySetResult(reason));

        // A second daemon on the same bus is refused the name instead of queueing behind the first.
        var second = Assert.Throws<DBusErrorReplyException>(() => DaemonBus.Open(bus.Address, Api(), NullLogger.Instance, _ => { }));
        Assert.Equal("org.freedesktop.DBus.Error.NameExists", second.ErrorName);
        Assert.False(lost.Task.IsCompleted);

        bus.Dispose(); // kills dbus-daemon
        Assert.NotEmpty(await lost.Task.WaitAsync(TimeSpan.FromSeconds(10)));
    }

    [Fact]
    public async Task Closing_the_daemons_connection_is_not_a_loss()
    {
        using var bus = new PrivateBus();
        var lost = new TaskCompletionSource<string>(TaskCreationOptions.RunContinuationsAsynchronously);
        var daemon = DaemonBus.Open(bus.Address, Api(), NullLogger.Instance, reason => lost.TrySetResult(reason));
        daemon.Dispose();
        await Task.Delay(500);
        Assert.False(lost.Task.IsCompleted);
        using var client = TestBus.Open(bus.Address);
        var owner = Assert.Throws<DBusErrorReplyException>(() => client.Call("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
            "GetNameOwner", "s", (ref MessageWriter w) => w.WriteString(ManagerApi.BusName), static (m, _) => m.GetBodyReader().ReadString(), TestBus.Timeout));
        Assert.Equal("org.freedesktop.DBus.Error.NameHasNoOwner", owner.ErrorName);
    }
}
