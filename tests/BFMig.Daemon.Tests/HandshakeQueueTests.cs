using System.Globalization;
using System.Net;
using System.Net.Sockets;
using BFMig.Daemon.Configuration;
using BFMig.Daemon.Tests.Infrastructure;
using BFMig.Daemon.Transfers;
using BFMig.Transfer.Wire;
using Microsoft.Extensions.Logging.Abstractions;

namespace BFMig.Daemon.Tests;

/// <summary>
/// Guests arriving together open more incoming streams at once than there are handshake slots
/// (issue 15: 4 guests each way, a memory and a disk stream each). The streams beyond the slots
/// wait for one instead of being refused (a refused stream fails its guest's migration), and the
/// slots still bound how many unauthenticated helpers run. The helper here is a small script that
/// reports its authentication after a pause: the real helper's handshake is covered by the data
/// path tests and the lab.
/// </summary>
public sealed class HandshakeQueueTests : IDisposable
{
    private readonly string _root = Directory.CreateTempSubdirectory("bfmig-handshakes-").FullName;
    private readonly List<Socket> _sockets = [];

    public void Dispose()
    {
        foreach (var s in _sockets)
            s.Dispose();
        Directory.Delete(_root, recursive: true);
    }

    [Fact]
    public async Task More_streams_than_handshake_slots_all_start_and_at_most_the_slots_are_unauthenticated_at_once()
    {
        const int streams = 3 * TransferManager.HandshakeSlots;
        var events = Path.Combine(_root, "events");
        var manager = Manager(FakeHelper(events, authenticateAfter: "0.3"));
        var finished = 0;
        manager.StreamFinished += _ => Interlocked.Increment(ref finished);

        var started = await Task.WhenAll(Enumerable.Range(0, streams).Select(async i =>
            await manager.StartReceiveAsync($"guest{i}", Guid.NewGuid(), "hosta", StreamKind.Mig, "unix:/nonexistent", await AcceptedSocketAsync(), [])));

        Assert.All(started, Assert.True);
        await Tools.UntilAsync(() => Volatile.Read(ref finished) == streams, "every stream to end", 30);
        var (peak, starts) = PeakUnauthenticated(events);
        Assert.Equal(streams, starts);
        Assert.InRange(peak, 1, TransferManager.HandshakeSlots);
        await manager.ShutdownAsync(TimeSpan.Zero);
    }

    [Fact]
    public async Task A_stream_that_finds_every_slot_held_waits_for_one_until_the_deadline_instead_of_being_refused_at_once()
    {
        var events = Path.Combine(_root, "events");
        // Helpers that never authenticate hold every slot until the handshake deadline kills them.
        var manager = Manager(FakeHelper(events, authenticateAfter: null));
        for (int i = 0; i < TransferManager.HandshakeSlots; i++)
            Assert.True(await manager.StartReceiveAsync($"guest{i}", Guid.NewGuid(), "hosta", StreamKind.Mig, "unix:/nonexistent", await AcceptedSocketAsync(), []));
        var waited = System.Diagnostics.Stopwatch.StartNew();
        var late = await AcceptedSocketAsync();
        // The killed helpers free their slots at the deadline, just as the waiter's own deadline ends: either outcome is bounded.
        bool accepted = await manager.StartReceiveAsync("late", Guid.NewGuid(), "hosta", StreamKind.Mig, "unix:/nonexistent", late, []);
        Assert.InRange(waited.Elapsed, TransferManager.HandshakeDeadline - TimeSpan.FromSeconds(1), TransferManager.HandshakeDeadline + TimeSpan.FromSeconds(5));
        if (!accepted)
            Assert.Throws<ObjectDisposedException>(() => late.Send(new byte[1]));
        await manager.ShutdownAsync(TimeSpan.Zero);
    }

    /// <summary>
    /// A route frame names a guest and a peer in clear, so anyone who saw one migration can open
    /// routable streams that never authenticate. From addresses of no configured peer they take at
    /// most the strangers' share of the handshake slots and of the waiters: a stream from a
    /// peer's own address still starts at once, and a stranger's beyond the share is refused.
    /// </summary>
    [Fact]
    public async Task Streams_from_strangers_that_never_authenticate_leave_the_peers_their_share_of_handshake_slots()
    {
        var events = Path.Combine(_root, "events");
        var manager = Manager(FakeHelper(events, authenticateAfter: null));
        // As many as the strangers' share of the slots and of the waiters: without the share they would take every slot.
        int strangers = PeerListener.StrangersShare(TransferManager.HandshakeSlots) + PeerListener.StrangersShare(TransferManager.MaxHandshakeWaiters);
        var waiting = new List<Task<bool>>();
        for (int i = 0; i < strangers; i++)
            waiting.Add(manager.StartReceiveAsync($"s{i}", Guid.NewGuid(), "hosta", StreamKind.Mig, "unix:/nonexistent", await AcceptedSocketAsync(), [], stranger: true));
        await Tools.UntilAsync(() => File.Exists(events) && File.ReadAllLines(events).Count(l => l.EndsWith(" start", StringComparison.Ordinal)) == PeerListener.StrangersShare(TransferManager.HandshakeSlots),
            "the strangers' share of the slots to start", 10);
        waiting.RemoveAll(w => w.IsCompleted);
        Assert.Equal(PeerListener.StrangersShare(TransferManager.MaxHandshakeWaiters), waiting.Count);

        var clock = System.Diagnostics.Stopwatch.StartNew();
        Assert.True(await manager.StartReceiveAsync("peer", Guid.NewGuid(), "hosta", StreamKind.Mig, "unix:/nonexistent", await AcceptedSocketAsync(), []));
        Assert.True(clock.Elapsed < TimeSpan.FromSeconds(3), $"the peer's stream waited {clock.Elapsed}");
        var refused = await AcceptedSocketAsync();
        Assert.False(await manager.StartReceiveAsync("over", Guid.NewGuid(), "hosta", StreamKind.Mig, "unix:/nonexistent", refused, [], stranger: true));
        Assert.True(clock.Elapsed < TimeSpan.FromSeconds(3), $"the stranger beyond the share waited {clock.Elapsed}");
        Assert.Throws<ObjectDisposedException>(() => refused.Send(new byte[1]));
        Assert.All(waiting, w => Assert.False(w.IsCompleted));
        await manager.ShutdownAsync(TimeSpan.Zero);
        await Task.WhenAll(waiting).WaitAsync(TransferManager.HandshakeDeadline + TimeSpan.FromSeconds(10));
    }

    /// <summary>
    /// A real peer that connects from an address missing from its configuration works, with the
    /// strangers' share of the handshake places: bfmigd says so once it proved itself, once per peer.
    /// </summary>
    [Fact]
    public async Task A_peer_that_proves_itself_from_an_address_not_in_its_configuration_is_told_once()
    {
        var events = Path.Combine(_root, "events");
        var log = new TransparentInterceptorTests.Lines();
        var manager = Manager(FakeHelper(events, authenticateAfter: "0.1"), logger: log);
        for (int i = 0; i < 2; i++)
            Assert.True(await manager.StartReceiveAsync($"g{i}", Guid.NewGuid(), "hosta", StreamKind.Mig, "unix:/nonexistent", await AcceptedSocketAsync(), [], stranger: true));
        Assert.True(await manager.StartReceiveAsync("listed", Guid.NewGuid(), "hosta", StreamKind.Mig, "unix:/nonexistent", await AcceptedSocketAsync(), []));
        await Tools.UntilAsync(() => File.Exists(events) && File.ReadAllLines(events).Count(l => l.EndsWith(" auth", StringComparison.Ordinal)) == 3, "three proofs", 10);
        await Task.Delay(200);
        var told = log.All.Where(l => l.Contains("an address not in its configuration", StringComparison.Ordinal)).ToArray();
        var line = Assert.Single(told);
        Assert.Contains("peer hosta proved itself from 127.0.0.1:", line, StringComparison.Ordinal);
        await manager.ShutdownAsync(TimeSpan.Zero);
    }

    /// <summary>
    /// Libvirt resumed the guest here: its receiving memory helper, started with
    /// <c>--commit-after-resume</c>, is told by SIGCONT (its store's commit waits for that, off
    /// libvirt's last fsync before the resume); its disk helper and another guest's are not.
    /// </summary>
    [Fact]
    public async Task The_guest_running_here_is_told_to_its_receiving_memory_helper_and_to_no_other()
    {
        var events = Path.Combine(_root, "events");
        var manager = Manager(WaitingHelper(events));
        var guest = Guid.NewGuid();
        var other = Guid.NewGuid();
        Assert.True(await manager.StartReceiveAsync("g", guest, "hosta", StreamKind.Mig, "unix:/nonexistent", await AcceptedSocketAsync(), []));
        Assert.True(await manager.StartReceiveAsync("g", guest, "hosta", StreamKind.Nbd, "unix:/nonexistent", await AcceptedSocketAsync(), []));
        Assert.True(await manager.StartReceiveAsync("o", other, "hosta", StreamKind.Mig, "unix:/nonexistent", await AcceptedSocketAsync(), []));
        await Tools.UntilAsync(() => File.Exists(events) && File.ReadAllLines(events).Count(l => l.StartsWith("start ", StringComparison.Ordinal)) == 3, "three helpers to start", 10);

        Assert.Equal(1, manager.GuestRuns(guest));

        await Tools.UntilAsync(() => File.ReadAllLines(events).Any(l => l.StartsWith("cont ", StringComparison.Ordinal)), "the signal to arrive", 10);
        var starts = File.ReadAllLines(events).Where(l => l.StartsWith("start ", StringComparison.Ordinal)).ToArray();
        Assert.Equal(2, starts.Count(l => l.Contains("--kind mig", StringComparison.Ordinal) && l.Contains("--commit-after-resume", StringComparison.Ordinal)));
        Assert.DoesNotContain(starts, l => l.Contains("--kind nbd", StringComparison.Ordinal) && l.Contains("--commit-after-resume", StringComparison.Ordinal));
        await Task.Delay(300);
        var told = File.ReadAllLines(events).Where(l => l.StartsWith("cont ", StringComparison.Ordinal)).ToArray();
        var only = Assert.Single(told);
        Assert.Contains("--kind mig", only, StringComparison.Ordinal);
        Assert.Contains(guest.ToString("D"), only, StringComparison.Ordinal);
        await manager.ShutdownAsync(TimeSpan.Zero);
    }

    /// <summary>
    /// What the daemon records of an arrival (where the guest comes from) waits for the peer to
    /// prove its name: a receiving helper whose peer never authenticates records nothing.
    /// </summary>
    [Fact]
    public async Task An_arrival_is_recorded_only_once_its_peer_authenticated()
    {
        var events = Path.Combine(_root, "events");
        int recorded = 0;
        var proving = Manager(FakeHelper(events, authenticateAfter: "1"));
        var guest = Guid.NewGuid();
        Assert.True(await proving.StartReceiveAsync("g", guest, "hosta", StreamKind.Mig, "unix:/nonexistent", await AcceptedSocketAsync(), [],
            authenticated: () => Interlocked.Increment(ref recorded)));
        Assert.Equal(0, Volatile.Read(ref recorded)); // started, not yet authenticated
        Assert.Null(proving.ReceivingFrom(guest)); // nor is it arriving from anyone yet
        await Tools.UntilAsync(() => Volatile.Read(ref recorded) == 1, "the record after authentication", 10);
        Assert.Equal("hosta", proving.ReceivingFrom(guest));
        await proving.ShutdownAsync(TimeSpan.Zero);

        int claimed = 0;
        var silent = Manager(FakeHelper(Path.Combine(_root, "events2"), authenticateAfter: null));
        Assert.True(await silent.StartReceiveAsync("g", Guid.NewGuid(), "hosta", StreamKind.Mig, "unix:/nonexistent", await AcceptedSocketAsync(), [],
            authenticated: () => Interlocked.Increment(ref claimed)));
        await Task.Delay(1000);
        await silent.ShutdownAsync(TimeSpan.Zero);
        Assert.Equal(0, Volatile.Read(ref claimed));
    }

    /// <summary>
    /// A trip comes from one host: two first streams of a guest from two peers may both be routed
    /// before either proved itself, and the one whose peer proves itself second is stopped, not
    /// joined to the trip (nothing is recorded for it).
    /// </summary>
    [Fact]
    public async Task A_stream_of_a_guest_already_arriving_from_another_authenticated_peer_is_stopped_at_its_authentication()
    {
        var manager = Manager(FakeHelper(Path.Combine(_root, "events"), authenticateAfter: "0.5", runsOn: "10"));
        var guest = Guid.NewGuid();
        int fromA = 0, fromC = 0;
        Assert.True(await manager.StartReceiveAsync("g", guest, "hosta", StreamKind.Mig, "unix:/nonexistent", await AcceptedSocketAsync(), [],
            authenticated: () => Interlocked.Increment(ref fromA)));
        await Tools.UntilAsync(() => Volatile.Read(ref fromA) == 1, "hosta's stream to authenticate", 10);
        Assert.True(await manager.StartReceiveAsync("g", guest, "hostc", StreamKind.Nbd, "unix:/nonexistent", await AcceptedSocketAsync(), [],
            authenticated: () => Interlocked.Increment(ref fromC)));
        await Task.Delay(1500);
        Assert.Equal(0, Volatile.Read(ref fromC));
        Assert.Equal("hosta", manager.ReceivingFrom(guest));
        await manager.ShutdownAsync(TimeSpan.Zero);
    }

    /// <summary>
    /// Transparent mode takes a transfer slot before it hands a connection on (a stream it cannot
    /// start must be carried at stock cost, not closed): the reservations and the running helpers
    /// are one count, so neither an intercepted stream nor an explicit one gets past the limit.
    /// </summary>
    [Fact]
    public async Task Intercepted_streams_reserve_their_slot_first_and_one_over_the_limit_is_left_to_carry()
    {
        var events = Path.Combine(_root, "events");
        var manager = Manager(WaitingHelper(events), maxTransfers: 2);
        var peer = Options().Peers[0];
        Assert.True(manager.TryReserveSend());
        Assert.True(manager.TryReserveSend());
        Assert.False(manager.TryReserveSend()); // both slots are promised
        Assert.False(manager.StartSend("x", Guid.NewGuid(), peer, StreamKind.Mig, await AcceptedSocketAsync(), []));
        Assert.True(manager.StartSend("a", Guid.NewGuid(), peer, StreamKind.Mig, await AcceptedSocketAsync(), [], targetPort: 49152, reserved: true));
        Assert.True(manager.StartSend("b", Guid.NewGuid(), peer, StreamKind.Nbd, await AcceptedSocketAsync(), [], targetPort: 49153, reserved: true));
        Assert.False(manager.TryReserveSend()); // both slots are running
        await Tools.UntilAsync(() => File.Exists(events) && File.ReadAllLines(events).Length == 2, "two helpers to start", 10);
        await manager.ShutdownAsync(TimeSpan.Zero);
        Assert.Equal(2, File.ReadAllLines(events).Length);
    }

    /// <summary>
    /// A memory connection of a guest whose memory stream is already being sent from here is a
    /// multifd channel or QEMU's post-copy preempt channel: its helper is told (<c>--follows-main</c>),
    /// and one that QEMU keeps silent then says hello at once instead of waiting for bytes that
    /// come only once the destination, itself waiting for that channel, runs the guest. The first
    /// memory stream, a disk stream and another guest's are not; in transparent mode only a
    /// connection to the port the memory stream goes to is.
    /// </summary>
    [Fact]
    public async Task A_memory_connection_after_the_guests_main_stream_is_told_it_follows_it()
    {
        var events = Path.Combine(_root, "events");
        var manager = Manager(WaitingHelper(events));
        var peer = Options().Peers[0];
        Guid guest = Guid.NewGuid(), other = Guid.NewGuid(), transparent = Guid.NewGuid();
        Assert.Null(manager.FollowerArgument(guest));
        Assert.True(manager.StartSend("g", guest, peer, StreamKind.Mig, await AcceptedSocketAsync(), []));
        Assert.Equal("--follows-main", manager.FollowerArgument(guest));
        Assert.True(manager.StartSend("g", guest, peer, StreamKind.Nbd, await AcceptedSocketAsync(), []));
        Assert.True(manager.StartSend("g", guest, peer, StreamKind.Mig, await AcceptedSocketAsync(), []));
        Assert.True(manager.StartSend("o", other, peer, StreamKind.Mig, await AcceptedSocketAsync(), []));
        Assert.True(manager.StartSend("t", transparent, peer, StreamKind.Mig, await AcceptedSocketAsync(), [], targetPort: 49152));
        Assert.Equal("--follows-main", manager.FollowerArgument(transparent));
        Assert.Equal(new OutgoingMemory(transparent, false), manager.MemoryGoingTo(peer.Name, 49152));
        Assert.Null(manager.MemoryGoingTo(peer.Name, 49153));
        Assert.Null(manager.MemoryGoingTo("elsewhere", 49152));
        await Tools.UntilAsync(() => File.Exists(events) && File.ReadAllLines(events).Length == 5, "five helpers to start", 10);
        var follows = File.ReadAllLines(events).Select(l => (Guest: l.Contains(guest.ToString("D"), StringComparison.Ordinal) ? "g" : l.Contains(other.ToString("D"), StringComparison.Ordinal) ? "o" : "t",
            Kind: l.Contains("--kind mig", StringComparison.Ordinal) ? "mig" : "nbd", Follows: l.Contains("--follows-main", StringComparison.Ordinal))).ToList();
        Assert.Equal([("g", "mig", false), ("g", "mig", true), ("g", "nbd", false), ("o", "mig", false), ("t", "mig", false)], [.. follows.Order()]);
        await manager.ShutdownAsync(TimeSpan.Zero);
    }

    /// <summary>
    /// A memory stream whose helper reports it armed for post-copy (QEMU advised post-copy RAM
    /// and iterates) makes the guest's next memory connection the preempt channel without a wait
    /// (<c>--post-copy-armed</c>), and transparent mode's sniff hears so for the port it goes to;
    /// a report that the stream is no longer armed (QEMU closed it) takes that back, and another
    /// guest's connections are never told.
    /// </summary>
    [Fact]
    public async Task A_memory_connection_after_a_main_stream_armed_for_post_copy_is_told_it_is_the_preempt_channel()
    {
        var events = Path.Combine(_root, "events");
        var disarm = Path.Combine(_root, "disarm");
        Guid armed = Guid.NewGuid(), other = Guid.NewGuid();
        var manager = Manager(WaitingHelper(events, armed, disarm));
        var peer = Options().Peers[0];
        Assert.True(manager.StartSend("a", armed, peer, StreamKind.Mig, await AcceptedSocketAsync(), [], targetPort: 49152));
        Assert.True(manager.StartSend("o", other, peer, StreamKind.Mig, await AcceptedSocketAsync(), [], targetPort: 49153));
        await Tools.UntilAsync(() => manager.FollowerArgument(armed) == "--post-copy-armed", "the armed report to arrive", 10);
        Assert.Equal("--follows-main", manager.FollowerArgument(other));
        Assert.Equal(new OutgoingMemory(armed, true), manager.MemoryGoingTo(peer.Name, 49152));
        Assert.Equal(new OutgoingMemory(other, false), manager.MemoryGoingTo(peer.Name, 49153));
        Assert.True(manager.StartSend("a", armed, peer, StreamKind.Mig, await AcceptedSocketAsync(), [], targetPort: 49152));
        Assert.True(manager.StartSend("o", other, peer, StreamKind.Mig, await AcceptedSocketAsync(), [], targetPort: 49153));
        await Tools.UntilAsync(() => File.ReadAllLines(events).Count(l => l.StartsWith("start ", StringComparison.Ordinal)) == 4, "four helpers to start", 10);
        var starts = File.ReadAllLines(events).Where(l => l.StartsWith("start ", StringComparison.Ordinal)).ToArray();
        var preempt = Assert.Single(starts, l => l.Contains("--post-copy-armed", StringComparison.Ordinal));
        Assert.Contains(armed.ToString("D"), preempt, StringComparison.Ordinal);
        Assert.DoesNotContain("--follows-main", preempt, StringComparison.Ordinal);
        var follower = Assert.Single(starts, l => l.Contains("--follows-main", StringComparison.Ordinal));
        Assert.Contains(other.ToString("D"), follower, StringComparison.Ordinal);

        File.WriteAllText(disarm, "");
        await Tools.UntilAsync(() => manager.FollowerArgument(armed) == "--follows-main", "the disarming report to arrive", 10);
        Assert.Equal(new OutgoingMemory(armed, false), manager.MemoryGoingTo(peer.Name, 49152));
        await manager.ShutdownAsync(TimeSpan.Zero);
    }

    // Logs its start with its arguments, and SIGCONT when it comes; runs 10 s unless signalled.
    // The first memory sender of guest armed (if any) reports its stream armed for post-copy on
    // its progress descriptor, and not armed once the file disarm exists.
    private string WaitingHelper(string events, Guid? armed = null, string? disarm = null)
    {
        var path = Path.Combine(_root, "waiting-helper");
        var report = "{\"role\":\"send\",\"kind\":\"mig\",\"localBytes\":0,\"wireBytesOut\":0,\"wireBytesIn\":0,\"final\":false,\"postCopyArmed\":";
        File.WriteAllText(path, $$"""
            #!/bin/sh
            trap 'echo "cont $*" >> {{events}}; exit 0' CONT
            echo "start $*" >> {{events}}
            fd=; prev=
            for a in "$@"; do [ "$prev" = --progress-fd ] && fd=$a; prev=$a; done
            armed=
            case " $* " in
              *" send "*"--kind mig"*"{{armed}}"*) case " $* " in *follows-main*|*post-copy-armed*) ;; *) armed=1 ;; esac ;;
            esac
            if [ -n "{{armed}}" ] && [ -n "$armed" ]; then
              eval "exec 9>&$fd"
              echo '{{report}}true}' >&9
              while [ ! -e "{{disarm}}" ]; do sleep 0.05; done
              echo '{{report}}false}' >&9
            fi
            i=0
            while [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
            exit 0

            """);
        File.SetUnixFileMode(path, UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.UserExecute);
        return path;
    }

    private DaemonOptions Options()
    {
        var conf = Path.Combine(_root, "bfmig.conf");
        File.WriteAllText(conf, DaemonHost.Ini("hostb", "hosta", 9).Replace("ROOT", _root, StringComparison.Ordinal).Replace("BUS", "unix:path=/nonexistent", StringComparison.Ordinal));
        return DaemonConfiguration.Load(DaemonConfiguration.Build(conf, [], new Dictionary<string, string?>()));
    }

    private TransferManager Manager(string helper, int? maxTransfers = null, Microsoft.Extensions.Logging.ILogger? logger = null)
    {
        var options = Options();
        if (maxTransfers is { } max)
            options = options with { MaxTransfers = max };
        var stats = Directory.CreateDirectory(Path.Combine(_root, "stats")).FullName;
        return new TransferManager(options, helper, stats, logger ?? NullLogger.Instance);
    }

    // Logs "start"/"auth" with a timestamp; reports authentication on the progress pipe (fd 4) after the pause, or never, and then runs on for runsOn seconds.
    private string FakeHelper(string events, string? authenticateAfter, string runsOn = "0.2")
    {
        var path = Path.Combine(_root, "fake-helper");
        const string report = """{"role":"receive","kind":"mig","localBytes":0,"wireBytesOut":0,"wireBytesIn":0,"final":false,"authenticated":true}""";
        var auth = authenticateAfter is null
            ? "sleep 60"
            : $"""
               sleep {authenticateAfter}
               echo "$(date +%s.%N) auth" >> {events}
               printf '%s\n' '{report}' >&4
               sleep {runsOn}
               """;
        File.WriteAllText(path, $"""
            #!/bin/sh
            echo "$(date +%s.%N) start" >> {events}
            {auth}
            exit 0

            """);
        File.SetUnixFileMode(path, UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.UserExecute);
        return path;
    }

    // The most helpers started but not yet authenticated at any moment, and how many started.
    private static (int Peak, int Starts) PeakUnauthenticated(string events)
    {
        int now = 0, peak = 0, starts = 0;
        foreach (var (_, what) in File.ReadAllLines(events)
                     .Select(l => l.Split(' '))
                     .Select(f => (Time: double.Parse(f[0], CultureInfo.InvariantCulture), What: f[1]))
                     .OrderBy(e => e.Time).ThenBy(e => e.What == "auth" ? 0 : 1))
        {
            if (what == "start")
            {
                starts++;
                peak = Math.Max(peak, ++now);
            }
            else
            {
                now--;
            }
        }
        return (peak, starts);
    }

    private async Task<Socket> AcceptedSocketAsync()
    {
        using var listener = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        listener.Bind(new IPEndPoint(IPAddress.Loopback, 0));
        listener.Listen(1);
        var client = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        _sockets.Add(client);
        await client.ConnectAsync(listener.LocalEndPoint!);
        return await listener.AcceptAsync();
    }
}
