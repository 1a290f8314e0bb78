using System.Net.Sockets;
using System.Text;
using BFMig.Native.Linux;
using BFMig.Transfer.Wire;

namespace BFMig.Transfer.Memory;

/// <summary>
/// A multifd channel's helper's side of its trip's <see cref="ChannelCodecService"/>: the
/// upstream a <see cref="TunnelBridge"/> copies the channel into (sender) or out of (receiver),
/// in place of the plain <see cref="PeerByteTunnel"/>. Sending, what QEMU writes goes to the
/// service and comes back as ops, sent as <see cref="FrameType.MultifdData"/> frames; receiving,
/// each such frame goes to the service and comes back as the channel's bytes. The other
/// direction (QEMU never writes on a destination channel, but nothing is lost if it does) stays
/// a plain tunnel. Ending the channel waits until the service has recorded every page.
/// </summary>
public sealed class CodedChannel : Stream, IPeerTunnel
{
    private readonly Socket _socket;
    private readonly NetworkStream _codec;
    private readonly PeerByteTunnel _tunnel;
    private readonly FrameReader _reader;
    private readonly FrameWriter _writer;
    private readonly bool _sending;
    private readonly TransferStats _stats;
    private readonly Ref<byte[]> _buffer = new(new byte[64 << 10]);
    private readonly Task? _pump;
    private readonly CancellationTokenSource _pumpStop = new();
    private ReadOnlyMemory<byte> _rebuilt;
    // Sending: a paced channel stays within a window of what the destination QEMU has taken (as the main stream does).
    private readonly StreamPacer? _pacer;
    private long _consumed;
    // Receiving: what QEMU has taken of the rebuilt channel, and what was last reported of it.
    private readonly bool _reportProgress;
    private long _handedOut;
    private long _reported;
    private readonly byte[] _progress = new byte[ProgressMessage.Length];
    private bool _inFrame;
    private bool _ended;
    private bool _finished;

    private CodedChannel(Socket socket, bool sending, FrameReader reader, FrameWriter writer, TransferStats stats, bool paced, TimeSpan stallTimeout)
    {
        _pacer = sending && paced ? new StreamPacer(stallTimeout) : null;
        _reportProgress = !sending && paced;
        _socket = socket;
        _codec = new NetworkStream(socket, ownsSocket: false);
        _tunnel = new PeerByteTunnel(reader, writer, onProgress: _pacer is null ? null : _pacer.OnProgress);
        _reader = reader;
        _writer = writer;
        _sending = sending;
        _stats = stats;
        if (sending) _pump = Task.Run(() => PumpOpsAsync(_pumpStop.Token));
    }

    /// <summary>
    /// Opens a session with the service of the guest's store under <paramref name="storeDirectory"/>,
    /// waiting up to <paramref name="wait"/> for it to appear and for its trip to begin. Returns the
    /// session, or null and why not (no main helper here, or its trip records nothing).
    /// </summary>
    public static async Task<(Socket? Session, string? WhyNot)> ConnectAsync(string storeDirectory, bool sending, TimeSpan wait, CancellationToken ct)
    {
        string path = ChannelCodecService.PathFor(storeDirectory);
        var deadline = DateTime.UtcNow + wait;
        while (true)
        {
            var socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
            try
            {
                await socket.ConnectAsync(new UnixDomainSocketEndPoint(path), ct);
                var (pid, uid, _) = UnixSockets.GetPeerCredentials(socket);
                if (uid != UnixUsers.EffectiveUid)
                {
                    socket.Dispose();
                    return (null, $"{path} is served by process {pid} of user {uid}, not a helper of this host");
                }
                await using var codec = new NetworkStream(socket, ownsSocket: false);
                await CodecMessages.WriteAsync(codec, CodecMessage.Open, new[] { sending ? (byte)1 : (byte)2 }, ct);
                var buffer = new Ref<byte[]>(new byte[4096]);
                // Connected: the main helper answers once its trip began, or refuses when it ends.
                using var timeout = CancellationTokenSource.CreateLinkedTokenSource(ct);
                timeout.CancelAfter(ReadyWait);
                ValueTask<(CodecMessage, int)?> read = CodecMessages.ReadAsync(codec, buffer, timeout.Token);
                (CodecMessage Type, int Length)? answer;
                try
                {
                    answer = await read;
                }
                catch (OperationCanceledException) when (!ct.IsCancellationRequested)
                {
                    socket.Dispose();
                    return (null, $"the main stream's helper did not begin its trip within {ReadyWait.TotalSeconds:0} s");
                }
                if (answer is { Type: CodecMessage.Ready }) return (socket, null);
                socket.Dispose();
                return (null, answer is { Type: CodecMessage.Refused } r
                    ? $"the main stream's helper refused: {Encoding.UTF8.GetString(buffer.Value, 0, r.Length)}"
                    : "the main stream's helper ended the session");
            }
            catch (SocketException) when (DateTime.UtcNow < deadline)
            {
                // Not listening yet: the main stream's helper starts a moment before its channels'.
                socket.Dispose();
                await Task.Delay(50, ct);
            }
            catch (Exception e) when (e is SocketException or IOException or PeerProtocolException or ArgumentException && !ct.IsCancellationRequested)
            {
                socket.Dispose();
                return (null, $"no codec session at {path}: {e.Message}");
            }
        }
    }

    /// <summary>How long a connected channel waits for its main stream's trip to begin (the block list comes within the main stream's first frames).</summary>
    public static readonly TimeSpan ReadyWait = TimeSpan.FromSeconds(30);

    /// <summary>
    /// The upstream of a sending channel: <paramref name="session"/> from <see cref="ConnectAsync"/>.
    /// <paramref name="paced"/>: stay within a window of what the destination QEMU has taken
    /// (its Progress frames), so that the source QEMU's bandwidth estimate counts an elided page
    /// when the destination has loaded it, not when its op left.
    /// </summary>
    public static CodedChannel ForSending(Socket session, FrameReader reader, FrameWriter writer, TransferStats stats, bool paced, TimeSpan stallTimeout) =>
        new(session, sending: true, reader, writer, stats, paced, stallTimeout);

    /// <summary>The upstream of a receiving channel: <paramref name="session"/> from <see cref="ConnectAsync"/>; <paramref name="paced"/>: report what QEMU has taken.</summary>
    public static CodedChannel ForReceiving(Socket session, FrameReader reader, FrameWriter writer, TransferStats stats, bool paced) =>
        new(session, sending: false, reader, writer, stats, paced, TimeSpan.Zero);

    // Sending: every Ops message becomes one frame, until Done.
    private async Task PumpOpsAsync(CancellationToken ct)
    {
        var buffer = new Ref<byte[]>(new byte[64 << 10]);
        while (true)
        {
            var message = await CodecMessages.ReadAsync(_codec, buffer, ct)
                ?? throw new PeerProtocolException("the main stream's helper closed the channel's codec session");
            switch (message.Type)
            {
                case CodecMessage.Ops:
                    await _writer.WriteAsync(FrameType.MultifdData, buffer.Value.AsMemory(0, message.Length), compress: true, ct);
                    if (_pacer is not null) await _writer.FlushAsync(ct);
                    break;
                case CodecMessage.Done:
                    CodecMessages.AddCounts(buffer.Value.AsSpan(0, message.Length), _stats);
                    return;
                case CodecMessage.Failed:
                    throw new PeerProtocolException($"the main stream's helper could not code the channel: {Encoding.UTF8.GetString(buffer.Value, 0, message.Length)}");
                default:
                    throw new PeerProtocolException($"unexpected {message.Type} from the main stream's helper");
            }
        }
    }

    public override async ValueTask WriteAsync(ReadOnlyMemory<byte> buffer, CancellationToken cancellationToken = default)
    {
        if (!_sending)
        {
            await _tunnel.WriteAsync(buffer, cancellationToken);
            return;
        }
        if (_pump!.IsFaulted) await _pump;
        while (!buffer.IsEmpty)
        {
            // Everything before _consumed is with the service, whose ops go out as they come: waiting cannot stall the channel.
            if (_pacer is not null && _pacer.MustWait(_consumed, zeroPages: 0))
                await _pacer.WaitForRoomAsync(_consumed, zeroPages: 0, cancellationToken);
            int n = Math.Min(buffer.Length, MultifdEncoder.MaxInput);
            await CodecMessages.WriteAsync(_codec, CodecMessage.Data, buffer[..n], cancellationToken);
            buffer = buffer[n..];
            _consumed += n;
            _pacer?.Sent(_consumed, zeroPages: 0);
        }
    }

    /// <summary>Ends the forward direction: the service codes and records the rest, then EOF goes to the peer.</summary>
    public async ValueTask ShutdownWriteAsync(CancellationToken ct = default)
    {
        if (_sending && !_finished)
        {
            _finished = true;
            await CodecMessages.WriteAsync(_codec, CodecMessage.Finish, ReadOnlyMemory<byte>.Empty, ct);
            await _pump!.WaitAsync(ct);
        }
        await _tunnel.ShutdownWriteAsync(ct);
    }

    public override async ValueTask<int> ReadAsync(Memory<byte> buffer, CancellationToken cancellationToken = default)
    {
        // Sending: the destination's return path, its Progress reports going to the pacer.
        if (_sending) return await _tunnel.ReadAsync(buffer, cancellationToken);
        await ReportProgressAsync(cancellationToken);
        while (_rebuilt.IsEmpty)
        {
            if (_ended) return 0;
            if (_inFrame)
            {
                await NextFromServiceAsync(cancellationToken);
                continue;
            }
            var frame = await _reader.ReadAsync(cancellationToken)
                ?? throw new PeerProtocolException("peer closed the connection without ending the channel");
            switch (frame.Type)
            {
                case FrameType.MultifdData:
                    await CodecMessages.WriteAsync(_codec, CodecMessage.Frame, frame.Payload, cancellationToken);
                    _inFrame = true;
                    break;
                case FrameType.TunnelEof:
                    await CodecMessages.WriteAsync(_codec, CodecMessage.Finish, ReadOnlyMemory<byte>.Empty, cancellationToken);
                    _inFrame = true;
                    _finished = true;
                    break;
                case FrameType.Abort:
                    throw new PeerAbortedException(Handshake.AbortReason(frame.Payload.Span));
                default:
                    throw new PeerProtocolException($"unexpected {frame.Type} frame in a coded multifd channel at byte {_reader.BytesRead}");
            }
        }
        int n = Math.Min(buffer.Length, _rebuilt.Length);
        _rebuilt[..n].CopyTo(buffer);
        _rebuilt = _rebuilt[n..];
        _stats.StreamBytes += n;
        _handedOut += n;
        return n;
    }

    // Receiving: the bridge asks for more only once it has written what it got to QEMU, so
    // everything handed out so far has been taken; reported every MigReceiver.ProgressStep.
    private async ValueTask ReportProgressAsync(CancellationToken ct)
    {
        if (!_reportProgress || _handedOut - _reported < MigReceiver.ProgressStep) return;
        _reported = _handedOut;
        new ProgressMessage(_reported).Encode(_progress);
        await _writer.WriteAsync(FrameType.Progress, _progress, compress: false, ct);
        await _writer.FlushAsync(ct);
    }

    // Receiving: the service's answer to the frame (or Finish) in flight.
    private async Task NextFromServiceAsync(CancellationToken ct)
    {
        var message = await CodecMessages.ReadAsync(_codec, _buffer, ct)
            ?? throw new PeerProtocolException("the main stream's helper closed the channel's codec session");
        switch (message.Type)
        {
            case CodecMessage.Bytes:
                _rebuilt = _buffer.Value.AsMemory(0, message.Length);
                break;
            case CodecMessage.FrameDone when !_finished:
                _inFrame = false;
                break;
            case CodecMessage.Done when _finished:
                CodecMessages.AddCounts(_buffer.Value.AsSpan(0, message.Length), _stats);
                _inFrame = false;
                _ended = true;
                break;
            case CodecMessage.Failed:
                throw new PeerProtocolException($"the main stream's helper could not rebuild the channel: {Encoding.UTF8.GetString(_buffer.Value, 0, message.Length)}");
            default:
                throw new PeerProtocolException($"unexpected {message.Type} from the main stream's helper");
        }
    }

    public override bool CanRead => true;
    public override bool CanWrite => true;
    public override bool CanSeek => false;
    public override long Length => throw new NotSupportedException();
    public override long Position { get => throw new NotSupportedException(); set => throw new NotSupportedException(); }

    public override Task<int> ReadAsync(byte[] buffer, int offset, int count, CancellationToken cancellationToken) =>
        ReadAsync(buffer.AsMemory(offset, count), cancellationToken).AsTask();

    public override Task WriteAsync(byte[] buffer, int offset, int count, CancellationToken cancellationToken) =>
        WriteAsync(buffer.AsMemory(offset, count), cancellationToken).AsTask();

    public override int Read(byte[] buffer, int offset, int count) => ReadAsync(buffer.AsMemory(offset, count)).AsTask().GetAwaiter().GetResult();

    public override void Write(byte[] buffer, int offset, int count) => WriteAsync(buffer.AsMemory(offset, count)).AsTask().GetAwaiter().GetResult();

    public override void Flush() => _writer.FlushAsync(CancellationToken.None).AsTask().GetAwaiter().GetResult();

    public override Task FlushAsync(CancellationToken cancellationToken) => _writer.FlushAsync(cancellationToken).AsTask();

    public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();

    public override void SetLength(long value) => throw new NotSupportedException();

    protected override void Dispose(bool disposing)
    {
        if (disposing)
        {
            _pumpStop.Cancel();
            _codec.Dispose();
            _socket.Dispose();
            _pumpStop.Dispose();
        }
        base.Dispose(disposing);
    }
}
