using BFMig.Daemon.Guests;
using BFMig.Daemon.Logging;
using BFMig.Daemon.Tests.Infrastructure;
using BFMig.Native.Libvirt;
using Microsoft.Extensions.Logging;

namespace BFMig.Daemon.Tests;

/// <summary>
/// The watcher on a real libvirt test driver of its own (a node file: not test:///default, whose
/// guest "test" the other tests' daemons share), with a small recording sink in place of the
/// daemon (the daemon's handling is covered by the tests that run it).
/// </summary>
public sealed class LibvirtWatcherTests : IDisposable
{
    private const string Uuid = "3c9d4a51-2f1e-4b8a-9d55-6f0e7a1b2c3d";
    private readonly string _dir = Directory.CreateTempSubdirectory("bfmig-watcher-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private sealed class FailingOnce : IGuestEvents
    {
        private readonly List<LibvirtLifecycleEvent> _seen = [];

        public IReadOnlyList<LibvirtLifecycleEvent> Seen
        {
            get
            {
                lock (_seen)
                    return [.. _seen];
            }
        }

        public void Reconcile(IReadOnlyCollection<(Guid Uuid, string Name)> running)
        {
        }

        public bool Audit(IReadOnlyCollection<(Guid Uuid, string Name)> running) => true;

        public void OnEvent(LibvirtDomainEvent domainEvent)
        {
            if (domainEvent is not LibvirtLifecycleDomainEvent e)
                return;
            int count;
            lock (_seen)
            {
                _seen.Add(e.Event);
                count = _seen.Count;
            }
            if (count == 1)
                throw new InvalidOperationException("a handler's bug");
        }
    }

    [Fact]
    public async Task An_event_whose_handling_throws_is_logged_and_the_events_after_it_still_come()
    {
        var node = Path.Combine(_dir, "node.xml");
        File.WriteAllText(node, $"""
            <node>
              <domain type='test'>
                <name>watched</name>
                <uuid>{Uuid}</uuid>
                <memory>65536</memory>
                <os><type>hvm</type></os>
              </domain>
            </node>
            """);
        var log = new StringWriter();
        var sink = new FailingOnce();
        Task run;
        using (var loggers = DaemonLogging.Create("debug", log, underJournal: false))
        {
            var watcher = new LibvirtWatcher("test://" + node, sink, loggers.CreateLogger("bfmigd.libvirt"));
            using var stop = new CancellationTokenSource();
            run = Task.Run(() => watcher.RunAsync(stop.Token));
            await Tools.UntilAsync(() => watcher.IsConnected, "the watcher to connect");
            // Through the watcher's own connection: a node file's state belongs to its connection.
            using (var domain = watcher.OpenDomain(Guid.Parse(Uuid))!)
            {
                domain.Suspend();
                domain.Resume();
            }
            await Tools.UntilAsync(() => sink.Seen.Count >= 2, "the event after the one whose handling failed");
            Assert.Equal([LibvirtLifecycleEvent.Suspended, LibvirtLifecycleEvent.Resumed], sink.Seen);
            Assert.False(run.IsCompleted, "the watcher ended after an event's handler failed");
            await stop.CancelAsync();
            await run;
        }
        Assert.Contains("handling LibvirtLifecycleDomainEvent of guest watched failed: a handler's bug; following libvirt goes on", log.ToString(), StringComparison.Ordinal);
        Assert.DoesNotContain("connection to", log.ToString(), StringComparison.Ordinal);
    }
}
