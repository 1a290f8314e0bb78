using System.Buffers;

namespace BFMig.Transfer.Disk.Nbd;

/// <summary>
/// A passive tap for the receiving host: it watches the bytes of one NBD connection (both
/// directions, from the greeting on) that the receiver pumps into its local NBD server and
/// computes the target's block map after the trip, independently of the sender. Starting from
/// the same retained map and seeing the requests the sender forwarded, it reports the same map
/// as <see cref="NbdSenderFilter"/>, so both sides can compare <see cref="DiskBlockMap.ComputeDigest"/>.
/// Call <see cref="OnClientBytes"/> before forwarding client bytes to the server and
/// <see cref="OnServerBytes"/> after reading server bytes; both are thread-safe.
/// </summary>
public sealed class NbdStreamObserver
{
    private readonly object _sync = new();
    private readonly NbdExportTracker _export;
    private readonly int _maxPayload;
    private readonly ByteQueue _fromClient;
    private readonly ByteQueue _fromServer;
    private readonly Queue<NbdOption> _options = new();
    private readonly Dictionary<ulong, Pending> _pending = [];
    private ClientPhase _clientPhase = ClientPhase.Flags;
    private ServerPhase _serverPhase = ServerPhase.Greeting;
    private NbdClientFlags _clientFlags;
    private NbdProtocolException? _failure;

    /// <summary>Creates a tap whose map starts as <paramref name="retained"/>.</summary>
    public NbdStreamObserver(IDiskBlockView retained, int maxPayload = 32 << 20)
    {
        _export = new NbdExportTracker(retained);
        _maxPayload = maxPayload;
        _fromClient = new ByteQueue(maxPayload + 64 * 1024);
        _fromServer = new ByteQueue(maxPayload + 64 * 1024);
    }

    /// <summary>Export size learnt from the handshake.</summary>
    public ulong ExportSize => _export.ExportSize;

    /// <summary>Negotiated header style.</summary>
    public NbdHeaderStyle Style => _export.Style;

    /// <summary>True once the client sent NBD_CMD_DISC.</summary>
    public bool SawDisconnect { get; private set; }

    /// <summary>
    /// True once the client said it is done (NBD_CMD_DISC, or NBD_OPT_ABORT in the handshake), so
    /// that the server may close; also true when the stream is not followed (opaque or failed), as
    /// then nobody can tell. Safe to read from either side's thread.
    /// </summary>
    public bool ClientFinished
    {
        get
        {
            lock (_sync)
                return _clientPhase == ClientPhase.Done || _clientAborted || Opaque || _failure is not null;
        }
    }

    private bool _clientAborted;

    /// <summary>True when the stream became opaque (STARTTLS): nothing can be known.</summary>
    public bool Opaque { get; private set; }

    /// <summary>True once the tap failed to follow the stream (it then stays failed).</summary>
    public bool Failed => _failure is not null;

    /// <summary>
    /// Called with the byte range of every WRITE, WRITE_ZEROES and TRIM as soon as the request is
    /// complete in the client's bytes, so before the bytes that complete it are forwarded
    /// (see <see cref="DiskDoubtJournal"/>).
    /// </summary>
    public Action<ulong, ulong>? Touching { get; init; }

    private enum ClientPhase
    {
        Flags,
        Options,
        AwaitingServer,
        Transmission,
        Done,
    }

    private enum ServerPhase
    {
        Greeting,
        Options,
        Transmission,
    }

    /// <summary>Feeds bytes the client sent. Throws <see cref="NbdProtocolException"/> on malformed input (and keeps failing after).</summary>
    public void OnClientBytes(ReadOnlySpan<byte> data)
    {
        lock (_sync)
        {
            ThrowIfFailed();
            if (Opaque)
                return;
            _fromClient.Append(data, "client");
            Run();
        }
    }

    /// <summary>Feeds bytes the server sent.</summary>
    public void OnServerBytes(ReadOnlySpan<byte> data)
    {
        lock (_sync)
        {
            ThrowIfFailed();
            if (Opaque)
                return;
            _fromServer.Append(data, "server");
            Run();
        }
    }

    /// <summary>
    /// Reports the resulting map. Clean only when the client disconnected with every request
    /// answered and no bytes left over.
    /// </summary>
    public void Report(IDiskRecorder recorder)
    {
        ArgumentNullException.ThrowIfNull(recorder);
        lock (_sync)
            _export.Report(recorder, _failure is null && SawDisconnect && _pending.Count == 0 && _fromClient.Length == 0 && _fromServer.Length == 0);
    }

    private void ThrowIfFailed()
    {
        if (_failure is not null)
            throw new NbdProtocolException(_failure.Message, _failure);
    }

    private void Run()
    {
        try
        {
            bool progress = true;
            while (progress)
                progress = StepClient() | StepServer();
        }
        catch (NbdProtocolException e)
        {
            _failure = e;
            throw;
        }
    }

    private bool StepClient()
    {
        var input = _fromClient.Buffered;
        long at = _fromClient.Position;
        switch (_clientPhase)
        {
            case ClientPhase.Flags:
                if (!NbdHandshake.TryReadClientFlags(ref input, at, out _clientFlags))
                    return false;
                _fromClient.ConsumeTo(input);
                _clientPhase = ClientPhase.Options;
                return true;
            case ClientPhase.Options:
                if (!NbdHandshake.TryReadOption(ref input, at, out var option))
                    return false;
                _fromClient.ConsumeTo(input);
                _options.Enqueue(option.Option);
                if (option.Option is NbdOption.Go or NbdOption.ExportName or NbdOption.StartTls or NbdOption.Abort)
                    _clientPhase = ClientPhase.AwaitingServer;
                // The server may close at once, without replying.
                _clientAborted |= option.Option == NbdOption.Abort;
                return true;
            case ClientPhase.Transmission:
                if (!NbdRequest.TryRead(ref input, Style == NbdHeaderStyle.Extended, _maxPayload, at, out var request))
                    return false;
                OnRequest(request, at);
                _fromClient.ConsumeTo(input);
                return true;
            default:
                if (_clientPhase == ClientPhase.Done && input.Length > 0)
                    throw NbdProtocolException.At("client", at, $"{input.Length} bytes after NBD_CMD_DISC");
                return false;
        }
    }

    private bool StepServer()
    {
        var input = _fromServer.Buffered;
        long at = _fromServer.Position;
        switch (_serverPhase)
        {
            case ServerPhase.Greeting:
                if (!NbdHandshake.TryReadGreeting(ref input, at, out _))
                    return false;
                _fromServer.ConsumeTo(input);
                _serverPhase = ServerPhase.Options;
                return true;
            case ServerPhase.Options:
                if (input.Length == 0)
                    return false;
                if (!_options.TryPeek(out var option))
                    throw NbdProtocolException.At("server", at, "option reply without an option asked");
                if (option == NbdOption.ExportName)
                {
                    if (!NbdHandshake.TryReadExportNameReply(ref input, (_clientFlags & NbdClientFlags.NoZeroes) != 0, out ulong size, out var flags))
                        return false;
                    _fromServer.ConsumeTo(input);
                    _options.Dequeue();
                    _export.OnExportInfo(size, flags);
                    StartTransmission();
                    return true;
                }
                if (!NbdHandshake.TryReadOptionReply(ref input, at, out var reply))
                    return false;
                if (reply.Option != option)
                    throw NbdProtocolException.At("server", at + 8, $"reply names option {(uint)reply.Option} but the client asked for {option}");
                var step = _export.OnOptionReply(option, reply, at);
                _fromServer.ConsumeTo(input);
                if (step == NbdOptionStep.MoreReplies)
                    return true;
                _options.Dequeue();
                if (_clientPhase == ClientPhase.AwaitingServer && _options.Count == 0)
                    _clientPhase = ClientPhase.Options;
                switch (step)
                {
                    case NbdOptionStep.Transmission:
                        StartTransmission();
                        break;
                    case NbdOptionStep.Opaque:
                        Opaque = true;
                        return false;
                    case NbdOptionStep.Aborted:
                        _clientPhase = ClientPhase.Done;
                        break;
                }
                return true;
            default:
                if (!NbdReplyHeader.TryPeek(input, Style, _maxPayload + 1024, at, out var header))
                    return false;
                if (!_pending.TryGetValue(header.Cookie, out var pending))
                    throw NbdProtocolException.At("server", at + NbdReplyHeader.CookieOffset, $"reply for unknown cookie 0x{header.Cookie:x}");
                long payload = header.Kind == NbdReplyKind.Simple
                    ? (pending.Command == NbdCommand.Read && header.Error == 0 ? (long)pending.Length : 0)
                    : (long)header.PayloadLength;
                if (input.Length < header.HeaderLength + payload)
                    return false;
                uint error = header.Kind == NbdReplyKind.Simple ? header.Error : 0;
                if (header.IsErrorChunk)
                    error = NbdReplyHeader.ParseChunkError(input.Slice(header.HeaderLength, payload), at + header.HeaderLength);
                if (error != 0)
                    pending.Failed = true;
                _fromServer.Consume(header.HeaderLength + payload);
                if (header.IsLast)
                {
                    _pending.Remove(header.Cookie);
                    // A failed request leaves its blocks unknown, as the request itself made them.
                    if (!pending.Failed)
                    {
                        foreach (var commit in pending.Commits)
                            _export.Apply(commit, succeeded: true);
                    }
                }
                return true;
        }
    }

    private void StartTransmission()
    {
        _serverPhase = ServerPhase.Transmission;
        _clientPhase = ClientPhase.Transmission;
        _export.StartTransmission();
    }

    private void OnRequest(in NbdRequest request, long at)
    {
        var pending = new Pending(request.Command, request.Length);
        bool touches = request.Command is NbdCommand.Write or NbdCommand.WriteZeroes or NbdCommand.Trim;
        if (request.Command == NbdCommand.Disconnect)
        {
            SawDisconnect = true;
            _clientPhase = ClientPhase.Done;
            return;
        }
        if (request.Command == NbdCommand.Resize)
            throw NbdProtocolException.At("client", at + 6, "RESIZE is not supported by the disk observer");
        if (!_pending.TryAdd(request.Cookie, pending))
            throw NbdProtocolException.At("client", at + 8, $"cookie 0x{request.Cookie:x} is already in flight");
        // Outside the export the server refuses it: nothing to journal.
        if (!touches || !_export.InRange(request.Offset, request.Length))
            return;
        Touching?.Invoke(request.Offset, request.Length);
        int blockSize = _export.BlockSize;
        ulong end = request.Offset + request.Length;
        byte[]? scratch = null;
        for (long b = (long)(request.Offset / (ulong)blockSize); b <= (long)((end - 1) / (ulong)blockSize); b++)
        {
            ulong blockStart = _export.BlockStart(b);
            ulong blockEnd = _export.BlockEnd(b);
            ulong start = Math.Max(request.Offset, blockStart);
            ulong stop = Math.Min(end, blockEnd);
            // Unknown until the server confirms: a failed request leaves it so.
            _export.Forget(b);
            bool full = start == blockStart && stop == blockEnd;
            if (!full || request.Command == NbdCommand.Trim)
                continue;
            if (request.Command == NbdCommand.WriteZeroes)
            {
                BlockCommit.Add(pending.Commits, b, BlockCommitKind.Zero);
                continue;
            }
            var piece = request.Payload.Slice((long)(start - request.Offset), (long)(stop - start));
            UInt128 hash;
            if (piece.IsSingleSegment)
            {
                hash = _export.HashBlock(piece.FirstSpan);
            }
            else
            {
                scratch ??= new byte[blockSize];
                piece.CopyTo(scratch);
                hash = _export.HashBlock(scratch.AsSpan(0, (int)piece.Length));
            }
            BlockCommit.Add(pending.Commits, b, BlockCommitKind.Data, hash);
        }
    }

    private sealed class Pending(NbdCommand command, ulong length)
    {
        public NbdCommand Command { get; } = command;

        public ulong Length { get; } = length;

        public List<BlockCommit> Commits { get; } = [];

        public bool Failed { get; set; }
    }

    // A bounded, contiguous byte queue for bytes pushed in by a caller.
    private sealed class ByteQueue(int capacity)
    {
        private byte[] _buffer = new byte[Math.Min(capacity, 64 * 1024)];
        private int _start;
        private int _end;

        public long Position { get; private set; }

        public int Length => _end - _start;

        public ReadOnlySequence<byte> Buffered => new(_buffer, _start, _end - _start);

        public void Append(ReadOnlySpan<byte> data, string name)
        {
            if (data.Length > _buffer.Length - _end)
            {
                int used = _end - _start;
                if ((long)used + data.Length > capacity)
                    throw NbdProtocolException.At(name, Position, $"message exceeds the buffer limit of {capacity} bytes");
                var target = used + data.Length <= _buffer.Length ? _buffer : new byte[Math.Min(capacity, Math.Max(_buffer.Length * 2, used + data.Length))];
                Buffer.BlockCopy(_buffer, _start, target, 0, used);
                _buffer = target;
                _start = 0;
                _end = used;
            }
            data.CopyTo(_buffer.AsSpan(_end));
            _end += data.Length;
        }

        public void Consume(long count)
        {
            _start += (int)count;
            Position += count;
            if (_start == _end)
                _start = _end = 0;
        }

        public void ConsumeTo(ReadOnlySequence<byte> rest) => Consume(Length - rest.Length);
    }
}
