using System.Net.Sockets;
using BFMig.Native.Linux;
using BFMig.Transfer.Wire;

namespace BFMig.Transfer.Memory;

/// <summary>
/// The store work of a trip's multifd channels, done by the one process that owns the guest's
/// store: the main stream's helper. Each channel keeps its own helper pair (its peer connection,
/// authentication and compression, on its own core) and sends this service what only the store
/// owner can do: a sending channel its QEMU bytes, to be coded (<see cref="MultifdEncoder"/>);
/// a receiving channel its ops, to be rebuilt (<see cref="MultifdDecoder"/>). The service listens
/// on <c>ROOT/UUID/mem/channels.sock</c>, a root-only directory, and serves only a process of its
/// own user (SO_PEERCRED). Channels wait for <see cref="Begin"/> (the main stream's block list)
/// before they are served; once <see cref="CloseAsync"/> runs, none is taken any more, and the
/// main helper commits only after every channel it served has ended cleanly.
/// </summary>
public sealed class ChannelCodecService : IAsyncDisposable
{
    /// <summary>The socket's name in the store's <c>mem</c> directory.</summary>
    public const string SocketName = "channels.sock";

    /// <summary>At most this many channels per trip (QEMU allows 255).</summary>
    public const int MaxChannels = 64;

    private readonly MemoryStore _store;
    private readonly bool _sending;
    private readonly Socket _listener;
    private readonly string _path;
    private readonly CancellationTokenSource _stop = new();
    private readonly TaskCompletionSource<string?> _ready = new(TaskCreationOptions.RunContinuationsAsynchronously);
    private readonly Lock _gate = new();
    // Channels whose session opened (each counted once; End tells the receiver how many).
    private readonly List<Task> _sessions = [];
    // Connections that have not opened a session yet.
    private readonly List<Task> _pending = [];
    private readonly HashSet<byte> _claimed = [];
    // Completed (and replaced) whenever a channel is admitted: CloseAsync counts again.
    private TaskCompletionSource _added = new(TaskCreationOptions.RunContinuationsAsynchronously);
    private readonly Task _accepting;
    private bool _synced;
    private PeerPageIndex? _peerIndex;
    private bool _closed;
    private Task? _disposing;
    private string? _failure;

    private ChannelCodecService(MemoryStore store, bool sending, Socket listener, string path)
    {
        _store = store;
        _sending = sending;
        _listener = listener;
        _path = path;
        _accepting = Task.Run(AcceptLoopAsync);
    }

    /// <summary>The socket path for the guest's store under <paramref name="storeDirectory"/> (<see cref="MemoryStore.GuestDirectory"/>).</summary>
    public static string PathFor(string storeDirectory) => Path.Combine(storeDirectory, "mem", SocketName);

    /// <summary>Listens for the channels of the trip that <paramref name="store"/> (locked by this process) is about to carry.</summary>
    public static ChannelCodecService Start(MemoryStore store, bool sending)
    {
        string path = PathFor(store.GuestDirectory);
        // The store's lock is ours: a socket left here is a dead helper's.
        File.Delete(path);
        var listener = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        try
        {
            listener.Bind(new UnixDomainSocketEndPoint(path));
            listener.Listen(MaxChannels);
        }
        catch
        {
            listener.Dispose();
            throw;
        }
        return new ChannelCodecService(store, sending, listener, path);
    }

    /// <summary>Channels served so far.</summary>
    public int Channels { get; private set; }

    /// <summary>Pages the channels carried, as the codecs counted them.</summary>
    public TransferStats Counts { get; } = new();

    /// <summary>
    /// The store trip began: channels may be served. <paramref name="synced"/>: the hello matched (a
    /// sender may elide against the departure snapshot both hosts share). <paramref name="peerIndex"/>:
    /// the trip is coded against the receiver's page index instead (a sender elides what it holds).
    /// </summary>
    public void Begin(bool synced, PeerPageIndex? peerIndex = null)
    {
        _synced = synced;
        _peerIndex = peerIndex;
        _ready.TrySetResult(null);
    }

    /// <summary>The trip will not record anything (no store trip, or it failed): waiting channels are refused with <paramref name="why"/>.</summary>
    public void Refuse(string why) => _ready.TrySetResult(why);

    /// <summary>
    /// Sender, at End: takes no more channels and returns how many it served (End tells the
    /// receiver, whose main helper then waits for exactly that many before it commits). A channel
    /// that comes later is carried byte for byte.
    /// </summary>
    public int Seal()
    {
        int count;
        lock (_gate)
        {
            _closed = true;
            count = _sessions.Count;
        }
        Refuse("the trip has ended");
        return count;
    }

    /// <summary>
    /// Waits up to <paramref name="timeout"/> until <paramref name="expected"/> channels have come
    /// (the receiver learns the count from End) and every channel served has ended, taking no more
    /// after that. Returns null when each ended cleanly (the store may be committed), else why not.
    /// </summary>
    public async Task<string?> CloseAsync(int expected, TimeSpan timeout)
    {
        var deadline = DateTime.UtcNow + timeout;
        Task[] sessions;
        while (true)
        {
            Task added;
            lock (_gate)
            {
                sessions = [.. _sessions];
                added = _added.Task;
                if (sessions.Length >= expected)
                {
                    _closed = true;
                    break;
                }
            }
            var left = deadline - DateTime.UtcNow;
            if (left <= TimeSpan.Zero)
            {
                Seal();
                return $"{sessions.Length} of the trip's {expected} multifd channels reached this host within {timeout.TotalSeconds:0} s";
            }
            await Task.WhenAny(added, Task.Delay(left));
        }
        Refuse("the trip has ended");
        _listener.Dispose();
        var all = Task.WhenAll(sessions);
        var rest = deadline - DateTime.UtcNow;
        if (await Task.WhenAny(all, Task.Delay(rest > TimeSpan.Zero ? rest : TimeSpan.Zero)) != all)
        {
            await _stop.CancelAsync();
            return $"{sessions.Count(s => !s.IsCompleted)} multifd channel(s) still open {timeout.TotalSeconds:0} s after the main stream ended";
        }
        lock (_gate)
            return _failure;
    }

    private async Task AcceptLoopAsync()
    {
        while (true)
        {
            Socket connection;
            try
            {
                connection = await _listener.AcceptAsync(_stop.Token);
            }
            catch (Exception e) when (e is OperationCanceledException or ObjectDisposedException or SocketException)
            {
                return;
            }
            if (Stranger(connection) is { } refusal)
            {
                TransferLog.Note($"bfmig-transfer: multifd channel refused: {refusal}");
                connection.Dispose();
                continue;
            }
            lock (_gate)
            {
                // Bounded: a connection costs a task only until it opens its session or the trip ends.
                if (_pending.Count + _sessions.Count >= 2 * MaxChannels)
                {
                    connection.Dispose();
                    continue;
                }
                _pending.Add(Task.Run(() => ServeAsync(connection)));
                _pending.RemoveAll(t => t.IsCompleted);
            }
        }
    }

    // A process of another user (SO_PEERCRED): not a helper of this host.
    private static string? Stranger(Socket connection)
    {
        try
        {
            var (pid, uid, _) = UnixSockets.GetPeerCredentials(connection);
            return uid != UnixUsers.EffectiveUid ? $"process {pid} of user {uid} is not a helper of this host" : null;
        }
        catch (SocketException e)
        {
            return e.Message;
        }
    }

    // A channel whose session opens is counted, once, in one step with the check that the trip still takes channels (Seal counts what was admitted).
    private string? Register(Task session)
    {
        lock (_gate)
        {
            if (_closed) return "the trip has ended";
            if (_sessions.Count >= MaxChannels) return $"{MaxChannels} channels already served";
            _sessions.Add(session);
            Channels++;
            var added = _added;
            _added = new(TaskCreationOptions.RunContinuationsAsynchronously);
            added.TrySetResult();
            return null;
        }
    }

    private async Task ServeAsync(Socket connection)
    {
        using var _ = connection;
        await using var stream = new NetworkStream(connection, ownsSocket: false);
        var buffer = new Ref<byte[]>(new byte[64 << 10]);
        var ct = _stop.Token;
        var served = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        bool registered = false;
        try
        {
            // Before the session opens, a connection that goes away is no channel of the trip: nothing to count or fail.
            if (await CodecMessages.ReadAsync(stream, buffer, ct) is not { Type: CodecMessage.Open, Length: 1 })
                return;
            bool wantsSending = buffer.Value[0] == 1;
            string? refusal = wantsSending != _sending ? $"this is the {(_sending ? "sending" : "receiving")} side of the trip"
                : await _ready.Task.WaitAsync(ct) ?? Register(served.Task);
            if (refusal is not null)
            {
                await RefuseAsync(stream, refusal, ct);
                return;
            }
            registered = true;
            await CodecMessages.WriteAsync(stream, CodecMessage.Ready, ReadOnlyMemory<byte>.Empty, ct);
            var counts = new TransferStats();
            if (_sending)
                await EncodeAsync(stream, buffer, counts, ct);
            else
                await DecodeAsync(stream, buffer, counts, ct);
            lock (_gate)
            {
                Counts.PagesElided += counts.PagesElided;
                Counts.PagesReferenced += counts.PagesReferenced;
                Counts.PagesDelta += counts.PagesDelta;
                Counts.PagesFull += counts.PagesFull;
            }
        }
        catch (Exception e) when (registered && (e is not OperationCanceledException || !ct.IsCancellationRequested))
        {
            lock (_gate)
                _failure ??= $"multifd channel: {e.Message}";
            TransferLog.Note($"bfmig-transfer: multifd channel failed: {e.Message}");
            try
            {
                await CodecMessages.WriteAsync(stream, CodecMessage.Failed, System.Text.Encoding.UTF8.GetBytes(e.Message), CancellationToken.None)
                    .AsTask().WaitAsync(TimeSpan.FromSeconds(1));
            }
            catch (Exception)
            {
                // The channel's helper is gone or stuck: its own end fails the channel anyway.
            }
        }
        catch (Exception e) when (e is IOException or SocketException or PeerProtocolException or OperationCanceledException)
        {
            // Went away, or spoke nonsense, before its session opened: not a channel of the trip.
        }
        finally
        {
            served.TrySetResult();
        }
    }

    // Called under the store's gate by a codec that has just read its channel's initial packet.
    private bool Claim(byte channel)
    {
        lock (_gate)
            return _claimed.Add(channel);
    }

    private static ValueTask RefuseAsync(Stream stream, string why, CancellationToken ct) =>
        CodecMessages.WriteAsync(stream, CodecMessage.Refused, System.Text.Encoding.UTF8.GetBytes(why), ct);

    // Sending side: QEMU's channel bytes in, ops out. Bytes a segment cut wait for the next Data.
    private async Task EncodeAsync(Stream stream, Ref<byte[]> buffer, TransferStats counts, CancellationToken ct)
    {
        var encoder = new MultifdEncoder(_store, _synced, counts) { ClaimChannel = Claim, PeerIndex = _peerIndex };
        var pending = new byte[MultifdEncoder.MaxInput + MultifdChannelParser.MaxSegmentLength];
        int length = 0;
        while (true)
        {
            var message = await CodecMessages.ReadAsync(stream, buffer, ct)
                ?? throw new PeerProtocolException("the channel's helper closed its codec session without finishing");
            bool final = message.Type == CodecMessage.Finish;
            if (!final && message.Type != CodecMessage.Data) throw new PeerProtocolException($"unexpected {message.Type} from a sending channel");
            var input = buffer.Value.AsMemory(0, message.Length);
            do
            {
                int take = Math.Min(input.Length, pending.Length - length);
                input.Span[..take].CopyTo(pending.AsSpan(length));
                input = input[take..];
                length += take;
                int start = 0;
                while (true)
                {
                    int chunk = Math.Min(length - start, MultifdEncoder.MaxInput);
                    bool last = final && input.IsEmpty && chunk == length - start;
                    int used = encoder.Consume(pending.AsSpan(start, chunk), last);
                    start += used;
                    if (encoder.OpsLength > 0)
                    {
                        await CodecMessages.WriteAsync(stream, CodecMessage.Ops, encoder.OpsMemory, ct);
                        encoder.ResetOps();
                    }
                    else if (used == 0)
                        break;
                }
                pending.AsSpan(start, length - start).CopyTo(pending);
                length -= start;
            }
            while (!input.IsEmpty);
            if (final)
            {
                await CodecMessages.WriteAsync(stream, CodecMessage.Done, CodecMessages.EncodeCounts(counts), ct);
                return;
            }
        }
    }

    // Receiving side: each frame's ops in, the rebuilt channel bytes out, then FrameDone.
    private async Task DecodeAsync(Stream stream, Ref<byte[]> buffer, TransferStats counts, CancellationToken ct)
    {
        var decoder = new MultifdDecoder(_store, counts) { ClaimChannel = Claim };
        while (true)
        {
            var message = await CodecMessages.ReadAsync(stream, buffer, ct)
                ?? throw new PeerProtocolException("the channel's helper closed its codec session without finishing");
            if (message.Type == CodecMessage.Finish)
            {
                decoder.Finish();
                await CodecMessages.WriteAsync(stream, CodecMessage.Done, CodecMessages.EncodeCounts(counts), ct);
                return;
            }
            if (message.Type != CodecMessage.Frame) throw new PeerProtocolException($"unexpected {message.Type} from a receiving channel");
            decoder.BeginFrame();
            int pos = 0;
            do
            {
                pos = decoder.Process(buffer.Value.AsSpan(0, message.Length), pos);
                if (decoder.Output.Length > 0)
                {
                    await CodecMessages.WriteAsync(stream, CodecMessage.Bytes, decoder.OutputMemory, ct);
                    decoder.ResetOutput();
                }
            }
            while (pos < message.Length);
            await CodecMessages.WriteAsync(stream, CodecMessage.FrameDone, ReadOnlyMemory<byte>.Empty, ct);
        }
    }

    /// <inheritdoc/>
    public ValueTask DisposeAsync()
    {
        lock (_gate)
            _disposing ??= DisposeOnceAsync();
        return new ValueTask(_disposing);
    }

    private async Task DisposeOnceAsync()
    {
        lock (_gate)
            _closed = true;
        Refuse("the trip has ended");
        await _stop.CancelAsync();
        _listener.Dispose();
        Task[] all;
        lock (_gate)
            all = [.. _sessions, .. _pending];
        await Task.WhenAny(Task.WhenAll(all), Task.Delay(TimeSpan.FromSeconds(2)));
        await Task.WhenAny(_accepting, Task.Delay(TimeSpan.FromSeconds(2)));
        try
        {
            File.Delete(_path);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            // Removed when the next trip's service starts.
        }
    }
}
