using BFMig.Native.Libvirt;

namespace BFMig.Native.Tests.Libvirt;

/// <summary>Domain events through libvirt's event loop, raised by the test driver.</summary>
[Collection(LibvirtCollection.Name)]
public sealed class EventTests
{
    private static async Task<LibvirtLifecycleDomainEvent> NextLifecycleAsync(LibvirtDomainEventSubscription subscription, string name)
    {
        using var timeout = new CancellationTokenSource(TimeSpan.FromSeconds(10));
        while (true)
        {
            LibvirtDomainEvent e = await subscription.Events.ReadAsync(timeout.Token);
            if (e is LibvirtLifecycleDomainEvent lifecycle && e.DomainName == name)
            {
                return lifecycle;
            }
        }
    }

    [Fact]
    public async Task Lifecycle_events_arrive_in_order_with_name_and_uuid()
    {
        using var conn = LibvirtConnection.Open(TestDriverTests.DefaultUri);
        using var subscription = conn.SubscribeDomainEvents();
        string name = TestDriverTests.UniqueName("bfmig-evt");
        string uuid = Guid.NewGuid().ToString();

        using (var dom = conn.DefineDomain(TestDriverTests.DomainXml(name, uuid)))
        {
            dom.Start();
            dom.Suspend();
            dom.Resume();
            dom.Destroy();
            dom.Undefine();
        }

        var seen = new List<LibvirtLifecycleEvent>();
        for (int i = 0; i < 6; i++)
        {
            LibvirtLifecycleDomainEvent e = await NextLifecycleAsync(subscription, name);
            Assert.Equal(uuid, e.DomainUuid);
            seen.Add(e.Event);
        }
        Assert.Equal(
            [LibvirtLifecycleEvent.Defined, LibvirtLifecycleEvent.Started, LibvirtLifecycleEvent.Suspended,
             LibvirtLifecycleEvent.Resumed, LibvirtLifecycleEvent.Stopped, LibvirtLifecycleEvent.Undefined],
            seen);
    }

    [Fact]
    public async Task Disposing_the_subscription_completes_the_channel_and_stops_delivery()
    {
        using var conn = LibvirtConnection.Open(TestDriverTests.DefaultUri);
        var subscription = conn.SubscribeDomainEvents();
        subscription.Dispose();
        subscription.Dispose();
        using var timeout = new CancellationTokenSource(TimeSpan.FromSeconds(10));
        await subscription.Events.Completion.WaitAsync(timeout.Token);

        // Events after deregistration must not reach the disposed subscription (nor crash
        // the loop through a freed GCHandle): a second subscription still works.
        using var second = conn.SubscribeDomainEvents();
        string name = TestDriverTests.UniqueName("bfmig-evt2");
        using (var dom = conn.DefineDomain(TestDriverTests.DomainXml(name)))
        {
            dom.Undefine();
        }
        Assert.Equal(LibvirtLifecycleEvent.Defined, (await NextLifecycleAsync(second, name)).Event);
        Assert.Equal(LibvirtLifecycleEvent.Undefined, (await NextLifecycleAsync(second, name)).Event);
        Assert.False(subscription.Events.TryRead(out _));
    }
}
