using System.Diagnostics;
using System.Net.Sockets;
using System.Net;
using BFMig.Daemon.Configuration;
using BFMig.Daemon.Logging;
using BFMig.Daemon.Sockets;
using BFMig.Daemon.Transfers;
using BFMig.Native.Linux;
using BFMig.Transfer;
using BFMig.Transfer.Wire;
using Microsoft.Extensions.Logging;

namespace BFMig.Daemon.Transparent;

/// <summary>What the interceptor needs from the rest of bfmigd.</summary>
public interface ITransparentHost
{
    /// <summary>Guests running here now (uuid, name).</summary>
    IReadOnlyCollection<(Guid Uuid, string Name)> RunningGuests();

    /// <summary>The guest whose memory stream a helper sends to <paramref name="targetPort"/> on <paramref name="peer"/> now, and whether that stream is armed for post-copy; null if none.</summary>
    OutgoingMemory? MemoryGoingTo(string peer, ushort targetPort);

    /// <summary>
    /// Starts a sending helper for an intercepted stream, which then owns <paramref name="qemu"/>
    /// (closed if the helper cannot start). False when no transfer slot is free
    /// (<c>transfer:max_concurrent</c>): the connection is still the caller's, to carry at stock cost.
    /// </summary>
    bool StartSend(string guest, Guid uuid, PeerOptions peer, StreamKind kind, Socket qemu, ushort targetPort);

    /// <summary>
    /// A stream of the guest's departure (<c>memory</c>, <c>disk</c>, <c>tls</c>, ...) goes
    /// straight to the peer's QEMU, and why (for the trip record), until the returned handle is disposed.
    /// </summary>
    IDisposable Carried(Guid uuid, string stream, string why);
}

/// <summary>
/// Transparent mode, source side: accepts the QEMU connections <see cref="RedirectTable"/>
/// redirected to loopback, learns where each was going (SO_ORIGINAL_DST), which guest's QEMU
/// made it (the kernel's socket table and the QEMU pid libvirt recorded) and what it carries
/// (<see cref="StreamSniffer"/>), then hands it to a sending helper exactly as an explicit-mode
/// socket would, naming the target port so that the peer's bfmigd can connect its receiver there.
/// Whatever it cannot accelerate (TLS, an unknown guest, a peer whose bfmigd does not
/// answer or speaks another protocol, no free slot) it carries straight to the original destination and says why.
/// </summary>
public sealed class TransparentInterceptor : IDisposable
{
    private static readonly TimeSpan PeerProbeTimeout = TimeSpan.FromSeconds(2);
    // A "same version" answer serves a memory stream and its multifd channels (they open within
    // moments of each other) and no longer: a peer that stops or is upgraded meanwhile would fail
    // the migration that a stream handed to a helper belongs to. A "no" only costs stock cost,
    // and spares a down or other-version peer a probe for every stream of a burst.
    private static readonly TimeSpan PeerProbeReuse = TimeSpan.FromSeconds(2);
    private static readonly TimeSpan PeerProbeReuseNegative = TimeSpan.FromSeconds(10);
    private static readonly TimeSpan DirectConnectTimeout = TimeSpan.FromSeconds(10);
    private static readonly TimeSpan OwnerRetryDelay = TimeSpan.FromMilliseconds(50);
    private const int OwnerAttempts = 20;
    // A migration opens a few connections per guest (memory, NBD, multifd channels); far more at
    // once is a flood (only QEMU's user and root can be redirected here), not migrations.
    private const int MaxConnections = 128;
    private readonly SemaphoreSlim _connections = new(MaxConnections);
    // Any local user can connect to the loopback port directly: what is dropped is logged at most
    // 10 lines per 10 s, with a count of the rest, like the peer port's refusals.
    private readonly LogRateLimiter _dropLog = new(10, TimeSpan.FromSeconds(10), TimeProvider.System);

    private readonly IReadOnlyList<Socket> _listeners;
    private readonly IReadOnlyDictionary<IPAddress, PeerOptions> _peersByAddress;
    private readonly ITransparentHost _host;
    private readonly QemuProcesses _qemu;
    private readonly TimeSpan _silence;
    private readonly ILogger _logger;
    private readonly CancellationTokenSource _stop = new();
    private readonly PeerProbeAnswers _probes;
    private readonly CarriedMainStreams _carriedMains = new();

    /// <summary>
    /// Binds the loopback listener(s) on <paramref name="port"/> (IPv4, and IPv6 when a peer has
    /// an IPv6 address). <paramref name="silence"/>: how long a connection may stay silent before
    /// it is taken for the NBD stream.
    /// </summary>
    public TransparentInterceptor(int port, IReadOnlyDictionary<IPAddress, PeerOptions> peersByAddress, ITransparentHost host, QemuProcesses qemu,
        TimeSpan silence, ILogger logger)
    {
        _peersByAddress = peersByAddress;
        _host = host;
        _qemu = qemu;
        _silence = silence;
        _logger = logger;
        _probes = new PeerProbeAnswers(p => PeerProbe.WhyNotAsync(p, PeerProbeTimeout, _stop.Token), PeerProbeReuse, PeerProbeReuseNegative, TimeProvider.System);
        var listeners = new List<Socket>();
        try
        {
            listeners.Add(Listen(new IPEndPoint(IPAddress.Loopback, port)));
            if (peersByAddress.Keys.Any(a => a.AddressFamily == AddressFamily.InterNetworkV6))
                listeners.Add(Listen(new IPEndPoint(IPAddress.IPv6Loopback, port)));
        }
        catch
        {
            foreach (var l in listeners)
                l.Dispose();
            throw;
        }
        _listeners = listeners;
        Port = ((IPEndPoint)listeners[0].LocalEndPoint!).Port;
    }

    /// <summary>The loopback port the redirect points at (real even when 0 was asked for).</summary>
    public int Port { get; }

    private static Socket Listen(IPEndPoint endpoint)
    {
        var socket = new Socket(endpoint.AddressFamily, SocketType.Stream, ProtocolType.Tcp);
        try
        {
            socket.SetSocketOption(SocketOptionLevel.Socket, SocketOptionName.ReuseAddress, true);
            if (endpoint.AddressFamily == AddressFamily.InterNetworkV6)
                socket.DualMode = false;
            socket.Bind(endpoint);
            socket.Listen(64);
            return socket;
        }
        catch
        {
            socket.Dispose();
            throw;
        }
    }

    /// <summary>Accepts until disposed; ends when the first of its listeners ends (one dead listener is a failure to see).</summary>
    public Task RunAsync() => Task.WhenAny(_listeners.Select(AcceptLoopAsync)).Unwrap();

    private Task AcceptLoopAsync(Socket listener) =>
        AcceptLoop.RunAsync(listener, "transparent port " + listener.LocalEndPoint, _logger, c => _ = HandleAsync(c), _stop.Token);

    private async Task HandleAsync(Socket connection)
    {
        if (!_connections.Wait(0))
        {
            Dropped(connection.RemoteEndPoint?.ToString() ?? "?", $"{MaxConnections} intercepted connections are already open");
            connection.Dispose();
            return;
        }
        try
        {
            await HandleOneAsync(connection).ConfigureAwait(false);
        }
        finally
        {
            _connections.Release();
        }
    }

    private async Task HandleOneAsync(Socket connection)
    {
        IPEndPoint original;
        try
        {
            original = UnixSockets.GetOriginalDestination(connection);
        }
        catch (SocketException e)
        {
            // Not redirected by our table (someone connected to the loopback port directly): nowhere to carry it.
            Dropped(connection.RemoteEndPoint?.ToString() ?? "?", e.Message);
            connection.Dispose();
            return;
        }
        try
        {
            await RouteAsync(connection, original).ConfigureAwait(false);
        }
        catch (Exception e) when (e is SocketException or IOException or ObjectDisposedException or OperationCanceledException)
        {
            Dropped(original.ToString(), e.Message);
            connection.Dispose();
        }
        catch (Exception e)
        {
            // A bug of ours must not leave QEMU waiting on a connection nobody serves (the
            // migration would hang, not fail): close it, so that QEMU fails the migration and
            // keeps the guest, and say what happened.
            Dropped(original.ToString(), $"internal error ({e.GetType().Name}): {e.Message}");
            connection.Dispose();
        }
    }

    private async Task RouteAsync(Socket connection, IPEndPoint original)
    {
        var qemuSide = (IPEndPoint)connection.RemoteEndPoint!;
        if (!_peersByAddress.TryGetValue(PeerOptions.Normalize(original.Address), out var peer))
        {
            // The table redirects only connections to a configured peer's address, so this one came
            // to the loopback port directly (any local user may connect there; with connection
            // tracking on it reports its real destination, this port). Carrying it would connect
            // here again, and again, until every slot is taken: it is dropped unanswered.
            Dropped(qemuSide.ToString(), $"not redirected to a configured peer (its destination was {original})");
            connection.Dispose();
            return;
        }
        // Sniff first: libvirtd connects the memory stream itself and hands it to QEMU, which
        // holds it (and writes to it) only from then on.
        // A connection to where a memory stream still goes is QEMU's own: a multifd channel, which
        // writes its magic at once, or the post-copy preempt channel, which stays silent while the
        // guest stands still waiting for it, so that one is not waited on for long, and not at all
        // once the memory stream's helper saw QEMU advise post-copy RAM and iterate.
        var going = _host.MemoryGoingTo(peer.Name, (ushort)original.Port);
        var follows = going?.Uuid ?? _carriedMains.GuestGoingTo(original);
        bool armed = going is { PostCopyArmed: true };
        var silence = follows is null ? _silence : TransferRunner.FollowerWait(armed);
        var clock = Stopwatch.StartNew();
        var (sniffed, after) = await StreamSniffer.SniffAsync(connection, silence, _stop.Token).ConfigureAwait(false);
        var (owner, firstLook) = await OwnerAsync(qemuSide, original).ConfigureAwait(false);
        if (armed && sniffed == SniffedStream.ServerFirst)
        {
            // QEMU connects its preempt channel itself, so the armed guest's QEMU holds it at the
            // first look: then only bytes that came during the lookup, or a stream disarmed
            // meanwhile, can still tell otherwise. A connection libvirtd made and is still handing
            // over, another guest's, or one nobody holds gets the usual wait (its owner is known
            // by now: not looked for again). The logged time counts from the accept.
            bool stillArmed = _host.MemoryGoingTo(peer.Name, (ushort)original.Port) is { PostCopyArmed: true } now && now.Uuid == follows;
            var wait = TransferRunner.FollowerWait(stillArmed && firstLook && owner?.Uuid == follows);
            var sinceAccept = clock.Elapsed;
            (sniffed, after) = await StreamSniffer.SniffAsync(connection, wait, _stop.Token).ConfigureAwait(false);
            after += sinceAccept;
        }
        // Silence on the port the guest's memory stream is still going to is not the disk mirror
        // (it has a port of its own, and connects before the memory stream): it is QEMU's
        // post-copy preempt channel, which writes only the pages the destination faults on.
        if (sniffed == SniffedStream.ServerFirst && owner is { } o && o.Uuid == follows)
            sniffed = SniffedStream.PreemptChannel;
        var stream = sniffed switch
        {
            SniffedStream.Memory => "memory",
            SniffedStream.ServerFirst => "disk",
            SniffedStream.PreemptChannel => "post-copy channel",
            _ => sniffed.ToString().ToLowerInvariant(),
        };
        if (owner is not { } guest)
        {
            await CarryAsync(connection, original, "?", peer.Name, stream, "no running guest's QEMU holds the connection").ConfigureAwait(false);
            return;
        }
        DaemonLog.TransparentIntercepted(_logger, guest.Name, stream, peer.Name, original.ToString(), (long)after.TotalMilliseconds);
        string? notAccelerated = sniffed switch
        {
            SniffedStream.Tls => "QEMU native TLS (--tls): the stream is encrypted end to end, carried byte for byte",
            SniffedStream.Unknown => "QEMU's first bytes are neither a migration stream nor a multifd channel: carried byte for byte",
            SniffedStream.Closed => "",
            _ => null,
        };
        if (notAccelerated == "")
        {
            connection.Dispose();
            return;
        }
        if (sniffed == SniffedStream.PreemptChannel)
        {
            // Straight to the peer's QEMU, whichever way the memory stream went: it carries only
            // the pages the running guest faults on, where latency is all (through a helper pair
            // the switch stood the guest still 110 ms longer, and every fault paid two more hops),
            // and QEMU records none of them in either store. Not a stream lost to stock cost, so
            // the trip record does not say it was carried.
            await CarryAsync(connection, original, guest.Name, peer.Name, stream,
                "QEMU's post-copy preempt channel (faulted pages, latency first) goes straight to the peer's QEMU").ConfigureAwait(false);
            return;
        }
        if (notAccelerated is null && sniffed == SniffedStream.Multifd)
            notAccelerated = _carriedMains.ChannelMustFollow(guest.Uuid);
        if (notAccelerated is null)
            notAccelerated = await _probes.WhyNotAsync(peer).ConfigureAwait(false);
        // A multifd channel goes through a helper pair like the main stream, never straight to the
        // peer: QEMU 7.2 on the destination takes its first connection for the main stream, and
        // only the peer's receiver can keep the channels behind it (MainChannelGate).
        var kind = sniffed is SniffedStream.Memory or SniffedStream.Multifd ? StreamKind.Mig : StreamKind.Nbd;
        if (notAccelerated is null)
        {
            if (_host.StartSend(guest.Name, guest.Uuid, peer, kind, connection, (ushort)original.Port))
            {
                DaemonLog.TransparentAccelerated(_logger, guest.Name, stream, peer.Name, original.Port);
                return;
            }
            notAccelerated = "every transfer slot is taken (transfer:max_concurrent)";
        }
        using (_host.Carried(guest.Uuid, stream, notAccelerated))
        using (sniffed == SniffedStream.Memory ? _carriedMains.Carrying(guest.Uuid, original, notAccelerated) : null)
            await CarryAsync(connection, original, guest.Name, peer.Name, stream, notAccelerated).ConfigureAwait(false);
    }

    private void Dropped(string remote, string reason)
    {
        if (!_dropLog.TryAcquire(out var suppressed))
            return;
        if (suppressed > 0)
            DaemonLog.TransparentDropsSuppressed(_logger, suppressed);
        DaemonLog.TransparentDropped(_logger, remote, reason);
    }

    /// <summary>
    /// The guest whose QEMU holds the connection, and whether it did at the first look.
    /// libvirtd's hand-over of a socket root made may take a moment, so such a one is looked for
    /// a few times; any other is looked for once (a table scan each: not to be multiplied for
    /// connections no guest's QEMU holds, such as a user-mode network's).
    /// </summary>
    private async Task<((Guid Uuid, string Name)? Owner, bool FirstLook)> OwnerAsync(IPEndPoint qemuSide, IPEndPoint original)
    {
        for (int attempt = 0; ; attempt++)
        {
            var (guest, handOver) = _qemu.OwnerOfConnection(qemuSide, original, _host.RunningGuests());
            if (guest is { } owner)
                return (owner, attempt == 0);
            if (!handOver || attempt == OwnerAttempts)
                return (null, false);
            await Task.Delay(OwnerRetryDelay, _stop.Token).ConfigureAwait(false);
        }
    }

    private async Task CarryAsync(Socket connection, IPEndPoint original, string guest, string peer, string stream, string why)
    {
        DaemonLog.TransparentNotAccelerated(_logger, guest, stream, peer, original.ToString(), why);
        var (bytes, error) = await DirectForwarder.RunAsync(connection, original, DirectConnectTimeout, _stop.Token).ConfigureAwait(false);
        DaemonLog.TransparentCarried(_logger, guest, stream, original.ToString(), bytes, error ?? "ok");
    }

    /// <summary>Stops accepting (streams already handed on are not affected).</summary>
    public void Dispose()
    {
        _stop.Cancel();
        foreach (var l in _listeners)
            l.Dispose();
    }
}
