using System.Net.Sockets;
using System.Net;
using System.Runtime.InteropServices;
using BFMig.Daemon.Configuration;
using BFMig.Daemon.Logging;
using BFMig.Daemon.Sockets;
using BFMig.Transfer.Wire;
using Microsoft.Extensions.Logging;

namespace BFMig.Daemon.Transfers;

/// <summary>Where an incoming stream goes, or why it is refused.</summary>
/// <param name="GuestName">The local guest name (for the socket path), null when refused.</param>
/// <param name="Reason">Why it was refused.</param>
public sealed record PeerRoute(string? GuestName, string Reason);

/// <summary>
/// Accepts the peers' data connections on <c>daemon:listen</c>. Each connection starts with the
/// sending helper's hello frame in clear (PSK mode) or a route frame before TLS (TLS mode); the
/// daemon peeks at it (MSG_PEEK, nothing is consumed) to learn guest and stream kind, routes it to
/// a receiving helper, and leaves authentication to that helper. A peer bfmigd's version probe
/// (<see cref="VersionProbe"/>) is answered here and closed. Garbage, unknown guests and unknown senders are closed with a
/// logged reason.
/// </summary>
public sealed class PeerListener : IDisposable
{
    /// <summary>Largest hello frame: header + 89 fixed bytes + a 255-byte sender name (a route frame is smaller).</summary>
    private const int MaxHelloFrame = FrameCodec.HeaderLength + 89 + 255;

    /// <summary>A real sender writes its hello or route right after connecting: a few seconds is generous.</summary>
    public static readonly TimeSpan HelloTimeout = TimeSpan.FromSeconds(5);

    /// <summary>Connections still waiting for their first frame, in total.</summary>
    public const int MaxPendingHellos = 64;

    /// <summary>
    /// Connections still waiting for their first frame, per source address: one host cannot take
    /// all <see cref="MaxPendingHellos"/>. A real peer sends its first frame at once, but several
    /// guests leaving together open a memory stream, multifd channels and disk streams each
    /// (4 guests with 2 channels: 16), and a connection refused here fails its guest's migration.
    /// </summary>
    public const int MaxPendingPerSource = 16;

    /// <summary>
    /// Of the pending slots, connections from addresses that are no configured peer's may hold at
    /// most this many together: hosts with a few addresses each (or one IPv6 host, whose /64 counts
    /// as one source) cannot keep every real peer out. A peer connecting from an address not in
    /// its configuration still gets these.
    /// </summary>
    public static readonly int MaxPendingFromStrangers = StrangersShare(MaxPendingHellos);

    /// <summary>
    /// The one rule for every pool a connection takes before its peer proved anything (pending
    /// hellos here, handshake slots and their waiters, checkpoint exchanges): connections from
    /// addresses that are no configured peer's ("strangers") share at most half of it, so that
    /// whatever they hold, the configured peers' own addresses still find room. A route frame
    /// names a guest and a peer in clear, so anyone who saw one migration could otherwise fill a
    /// pool with routable streams and fail the next.
    /// </summary>
    public static int StrangersShare(int capacity) => capacity / 2;

    private readonly Socket _socket;
    private readonly Func<RouteRequest, PeerRoute> _route;
    private readonly Func<RouteRequest, string, Socket, bool, Task> _accept;
    private readonly ILogger _logger;
    private readonly CancellationTokenSource _stop = new();
    private readonly Lock _gate = new();
    private readonly Dictionary<IPAddress, int> _pendingBySource = [];
    private readonly LogRateLimiter _rejections;
    private readonly IReadOnlySet<IPAddress> _peerSources;
    private int _pending;
    private int _pendingStrangers;

    /// <summary>
    /// Listens on <paramref name="endpoint"/>. <paramref name="route"/> decides per hello;
    /// <paramref name="accept"/> receives the hello, the guest name, the socket (which it then owns)
    /// and whether it comes from an address of no configured peer (a stranger's, <see cref="StrangersShare"/>).
    /// <paramref name="peerSources"/>: the configured peers' addresses (<see cref="PeerSources"/>).
    /// </summary>
    public PeerListener(IPEndPoint endpoint, Func<RouteRequest, PeerRoute> route, Func<RouteRequest, string, Socket, bool, Task> accept, ILogger logger,
        LogRateLimiter rejections, IReadOnlySet<IPAddress>? peerSources = null)
    {
        _rejections = rejections;
        _peerSources = peerSources ?? new HashSet<IPAddress>();
        _route = route;
        _accept = accept;
        _logger = logger;
        _socket = new Socket(endpoint.AddressFamily, SocketType.Stream, ProtocolType.Tcp);
        try
        {
            _socket.SetSocketOption(SocketOptionLevel.Socket, SocketOptionName.ReuseAddress, true);
            _socket.Bind(endpoint);
            _socket.Listen(16);
        }
        catch
        {
            _socket.Dispose();
            throw;
        }
        LocalEndPoint = (IPEndPoint)_socket.LocalEndPoint!;
    }

    /// <summary>The bound address (the port is real even when 0 was asked for).</summary>
    public IPEndPoint LocalEndPoint { get; }

    /// <summary>Accepts until disposed.</summary>
    public async Task RunAsync()
    {
        DaemonLog.PeerListening(_logger, LocalEndPoint.ToString());
        await AcceptLoop.RunAsync(_socket, "peer port " + LocalEndPoint, _logger, c => _ = HandleAsync(c), _stop.Token).ConfigureAwait(false);
    }

    private async Task HandleAsync(Socket connection)
    {
        var remote = connection.RemoteEndPoint as IPEndPoint;
        var remoteText = remote?.ToString() ?? "?";
        // A peer that connects and sends nothing must not pin resources: few pending hellos, few per
        // address, fewer for strangers, each with a deadline.
        var source = Source(remote?.Address);
        if (TryEnterPending(source) is { } full)
        {
            Reject(remoteText, full);
            connection.Dispose();
            return;
        }
        bool pending = true;
        try
        {
            RouteRequest? hello;
            try
            {
                hello = await PeekRouteAsync(connection, HelloTimeout, _stop.Token).ConfigureAwait(false);
                if (hello is null)
                {
                    await AnswerProbeAsync(connection, remoteText, _stop.Token).ConfigureAwait(false);
                    connection.Dispose();
                    return;
                }
            }
            catch (Exception e) when (e is PeerProtocolException or TimeoutException or SocketException or OperationCanceledException)
            {
                Reject(remoteText, e.Message);
                connection.Dispose();
                return;
            }
            var route = _route(hello);
            if (route.GuestName is null)
            {
                Reject(remoteText, route.Reason);
                connection.Dispose();
                return;
            }
            // Routed: it no longer waits for its hello (a slot of its own kind bounds what comes next).
            LeavePending(source);
            pending = false;
            await _accept(hello, route.GuestName, connection, source.Stranger).ConfigureAwait(false);
        }
        catch (Exception e)
        {
            Reject(remoteText, e.Message);
            connection.Dispose();
        }
        finally
        {
            if (pending)
                LeavePending(source);
        }
    }

    // Where a connection comes from, as the pending limits count it: a configured peer's address
    // as itself; any other IPv4 address as itself, and an IPv6 one by its /64 (one host may hold many).
    private readonly record struct PendingSource(IPAddress? Key, bool Stranger);

    private PendingSource Source(IPAddress? address)
    {
        if (address is null)
            return new PendingSource(null, Stranger: true);
        address = PeerOptions.Normalize(address);
        if (_peerSources.Contains(address))
            return new PendingSource(address, Stranger: false);
        if (address.AddressFamily == AddressFamily.InterNetworkV6)
        {
            var bytes = address.GetAddressBytes();
            Array.Clear(bytes, 8, 8);
            address = new IPAddress(bytes);
        }
        return new PendingSource(address, Stranger: true);
    }

    // Null when the connection may wait for its hello, else why not.
    private string? TryEnterPending(PendingSource source)
    {
        lock (_gate)
        {
            if (_pending >= MaxPendingHellos)
                return $"too many connections waiting for their hello ({MaxPendingHellos})";
            if (source.Stranger && _pendingStrangers >= MaxPendingFromStrangers)
                return $"too many connections from addresses of no configured peer waiting for their hello ({MaxPendingFromStrangers})";
            int fromSource = source.Key is null ? 0 : _pendingBySource.GetValueOrDefault(source.Key);
            if (fromSource >= MaxPendingPerSource)
                return $"too many connections from this address waiting for their hello ({MaxPendingPerSource})";
            _pending++;
            if (source.Stranger)
                _pendingStrangers++;
            if (source.Key is not null)
                _pendingBySource[source.Key] = fromSource + 1;
            return null;
        }
    }

    private void LeavePending(PendingSource source)
    {
        lock (_gate)
        {
            _pending--;
            if (source.Stranger)
                _pendingStrangers--;
            if (source.Key is not null && --CollectionsMarshal.GetValueRefOrNullRef(_pendingBySource, source.Key) == 0)
                _pendingBySource.Remove(source.Key);
        }
    }

    /// <summary>
    /// The addresses the configured peers connect from, as far as this host can tell: each one's
    /// <c>address</c> (resolved once, at start) and <c>migration_addresses</c>. One that does not
    /// resolve is left out (its connections then count as a stranger's, and still get through).
    /// </summary>
    public static IReadOnlySet<IPAddress> PeerSources(IEnumerable<PeerOptions> peers)
    {
        var set = new HashSet<IPAddress>();
        foreach (var peer in peers)
        {
            foreach (var a in peer.MigrationAddresses)
                if (IPAddress.TryParse(a, out var m))
                    set.Add(PeerOptions.Normalize(m));
            try
            {
                foreach (var a in peer.HostAddresses())
                    set.Add(PeerOptions.Normalize(a));
            }
            catch (SocketException)
            {
                // Counted as a stranger's until the daemon restarts with a name that resolves.
            }
        }
        return set;
    }

    /// <summary>Logs one refusal, within the rate limit shared by all of the peer port's refusals.</summary>
    private void Reject(string remote, string reason) => LogRejection(_logger, _rejections, remote, reason);

    /// <summary>Logs a refused peer connection unless the limiter holds it back; reports what it held back first.</summary>
    public static void LogRejection(ILogger logger, LogRateLimiter limiter, string remote, string reason) =>
        LogRejection(logger, limiter, () => DaemonLog.PeerRejected(logger, remote, reason));

    /// <summary>Logs one refusal of a peer's stream with <paramref name="line"/>, under the refusals' one rate limit (none: a line each).</summary>
    public static void LogRejection(ILogger logger, LogRateLimiter? limiter, Action line)
    {
        if (limiter is null)
        {
            line();
            return;
        }
        if (!limiter.TryAcquire(out var suppressed))
            return;
        if (suppressed > 0)
            DaemonLog.PeerRejectionsSuppressed(logger, suppressed, limiter.Burst, (int)limiter.Window.TotalSeconds);
        line();
    }

    /// <summary>
    /// A peer's bfmigd asked which protocol this one speaks (<see cref="VersionProbe"/>; the whole
    /// frame is queued): take the question off the socket, so that closing it ends the connection
    /// in order instead of resetting it under the answer, and answer. Nothing is routed; the probe
    /// is logged at debug level (a host learning this one's version from its answer leaves a trace
    /// there, not in the warnings of a rolling upgrade's every stream).
    /// </summary>
    private async Task AnswerProbeAsync(Socket connection, string remote, CancellationToken ct)
    {
        if (await VersionProbe.ReadFrameAsync(connection, ct).ConfigureAwait(false) is null)
            return;
        await connection.SendAsync(VersionProbe.Encode(FrameCodec.ProtocolVersion), SocketFlags.None, ct).ConfigureAwait(false);
        connection.Shutdown(SocketShutdown.Send);
        DaemonLog.PeerProbeAnswered(_logger, remote, FrameCodec.ProtocolVersion);
    }

    /// <summary>
    /// Waits until the whole first frame (a hello, or a route before TLS) is in the socket's
    /// receive queue and decodes it without consuming it; null when it is a well-formed version
    /// probe (<see cref="VersionProbe"/>) instead. Throws <see cref="PeerProtocolException"/>
    /// naming what is wrong.
    /// </summary>
    public static async Task<RouteRequest?> PeekRouteAsync(Socket socket, TimeSpan timeout, CancellationToken ct)
    {
        var buffer = new byte[MaxHelloFrame];
        var deadline = DateTime.UtcNow + timeout;
        int need = FrameCodec.HeaderLength;
        while (true)
        {
            int got = await PeekAsync(socket, buffer, deadline, ct).ConfigureAwait(false) is var peeked and >= 0
                ? peeked
                : throw new TimeoutException($"no complete hello within {timeout.TotalSeconds:F0} s");
            if (got == 0)
                throw new PeerProtocolException("connection closed before a hello");
            if (got >= FrameCodec.HeaderLength)
            {
                var header = FrameCodec.ParseHeader(buffer.AsSpan(0, FrameCodec.HeaderLength), 0);
                if (header.Type is not (FrameType.Hello or FrameType.Route or FrameType.Probe))
                    throw new PeerProtocolException($"first frame is {header.Type}, not a hello, route or probe (not bfmig-transfer?)");
                if (header.Codec != FrameCodecKind.None || header.WireLength > MaxHelloFrame - FrameCodec.HeaderLength)
                    throw new PeerProtocolException($"hello frame header at byte 0 is malformed (codec {header.Codec}, length {header.WireLength})");
                need = FrameCodec.HeaderLength + header.WireLength;
                if (got >= need)
                {
                    if (header.Type == FrameType.Probe)
                    {
                        // Checked (magic, length) and left to the caller to answer; the asker's own version does not matter.
                        VersionProbe.Decode(buffer.AsSpan(0, need));
                        return null;
                    }
                    var payload = buffer.AsSpan(FrameCodec.HeaderLength, header.WireLength);
                    return header.Type == FrameType.Route ? RouteRequest.Decode(payload) : RouteRequest.From(Hello.Decode(payload));
                }
            }
            if (socket.Available >= need)
                continue;
            // Not all of it yet: wait for more than what is queued now.
            await Task.Delay(20, ct).ConfigureAwait(false);
            if (DateTime.UtcNow > deadline)
                throw new TimeoutException($"hello incomplete after {timeout.TotalSeconds:F0} s ({got} of {need} bytes)");
        }
    }

    /// <summary>
    /// Copies what the socket has queued into <paramref name="buffer"/> without consuming it,
    /// waiting until at least one byte (or EOF: 0) is there; -1 at <paramref name="deadline"/>.
    /// Always asynchronous: a blocking peek (the earlier zero-byte wait followed by a synchronous
    /// receive) once hung a thread for good on a silent NBD client when the wait woke with nothing queued.
    /// </summary>
    internal static async Task<int> PeekAsync(Socket socket, Memory<byte> buffer, DateTime deadline, CancellationToken ct)
    {
        var left = deadline - DateTime.UtcNow;
        if (left <= TimeSpan.Zero)
            return -1;
        using var cts = CancellationTokenSource.CreateLinkedTokenSource(ct);
        cts.CancelAfter(left);
        try
        {
            return await socket.ReceiveAsync(buffer, SocketFlags.Peek, cts.Token).ConfigureAwait(false);
        }
        catch (OperationCanceledException) when (!ct.IsCancellationRequested)
        {
            return -1;
        }
    }

    /// <summary>Stops accepting (connections already handed on are not affected).</summary>
    public void Dispose()
    {
        _stop.Cancel();
        _socket.Dispose();
    }
}
