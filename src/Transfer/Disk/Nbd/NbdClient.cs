using System.Buffers.Binary;
using System.Buffers;
using System.Text;

namespace BFMig.Transfer.Disk.Nbd;

/// <summary>What <see cref="NbdClient.ConnectAsync"/> asks the server for.</summary>
public sealed class NbdClientOptions
{
    /// <summary>Export name ("" is the default export).</summary>
    public string ExportName { get; init; } = "";

    /// <summary>Send NBD_OPT_STRUCTURED_REPLY.</summary>
    public bool RequestStructuredReplies { get; init; } = true;

    /// <summary>Send NBD_OPT_EXTENDED_HEADERS first (as QEMU 10.0 does); falls back when the server refuses.</summary>
    public bool RequestExtendedHeaders { get; init; }

    /// <summary>Meta contexts to select with NBD_OPT_SET_META_CONTEXT (e.g. "base:allocation").</summary>
    public IReadOnlyList<string> MetaContexts { get; init; } = [];

    /// <summary>Largest READ/WRITE the client issues in one request.</summary>
    public int MaxRequest { get; init; } = 4 << 20;
}

/// <summary>
/// A small sequential NBD client (one request in flight): used to read an image through
/// qemu-nbd (a re-hash of a qcow2 image, <see cref="QemuNbdExport"/>; tests building a block map),
/// and by tests to script exact request sequences.
/// </summary>
public sealed class NbdClient : IAsyncDisposable
{
    private readonly Stream _stream;
    private readonly NbdInput _input;
    private readonly NbdClientOptions _options;
    private readonly byte[] _header = new byte[NbdRequest.ExtendedHeaderLength];
    private ulong _nextCookie = 0x1000;

    private NbdClient(Stream stream, NbdClientOptions options)
    {
        _stream = stream;
        _options = options;
        _input = new NbdInput(stream, "server", options.MaxRequest + 64 * 1024);
    }

    /// <summary>Export size in bytes.</summary>
    public ulong ExportSize { get; private set; }

    /// <summary>Transmission flags of the export.</summary>
    public NbdTransmissionFlags TransmissionFlags { get; private set; }

    /// <summary>Negotiated header style.</summary>
    public NbdHeaderStyle Style { get; private set; }

    /// <summary>Meta contexts the server selected (id, name).</summary>
    public IReadOnlyDictionary<uint, string> MetaContexts => _metaContexts;

    private readonly Dictionary<uint, string> _metaContexts = [];

    /// <summary>Performs the fixed-newstyle handshake and NBD_OPT_GO on <paramref name="stream"/>.</summary>
    public static async Task<NbdClient> ConnectAsync(Stream stream, NbdClientOptions? options, CancellationToken ct)
    {
        var client = new NbdClient(stream, options ?? new NbdClientOptions());
        try
        {
            await client.HandshakeAsync(ct);
            return client;
        }
        catch
        {
            await client.DisposeAsync();
            throw;
        }
    }

    private async Task HandshakeAsync(CancellationToken ct)
    {
        NbdHandshakeFlags flags;
        while (true)
        {
            var buffered = _input.Buffered;
            if (NbdHandshake.TryReadGreeting(ref buffered, _input.Position, out flags))
            {
                _input.ConsumeTo(buffered);
                break;
            }
            await FillAsync("server greeting", ct);
        }
        var clientFlags = NbdClientFlags.FixedNewstyle;
        if ((flags & NbdHandshakeFlags.NoZeroes) != 0)
            clientFlags |= NbdClientFlags.NoZeroes;
        var raw = new byte[4];
        BinaryPrimitives.WriteUInt32BigEndian(raw, (uint)clientFlags);
        await _stream.WriteAsync(raw, ct);

        if (_options.RequestExtendedHeaders)
        {
            var reply = await OptionAsync(NbdOption.ExtendedHeaders, [], ct);
            if (reply == NbdOptionReplyType.Ack)
                Style = NbdHeaderStyle.Extended;
        }
        if (Style != NbdHeaderStyle.Extended && _options.RequestStructuredReplies)
        {
            var reply = await OptionAsync(NbdOption.StructuredReply, [], ct);
            if (reply == NbdOptionReplyType.Ack)
                Style = NbdHeaderStyle.Structured;
        }
        byte[] name = Encoding.UTF8.GetBytes(_options.ExportName);
        if (_options.MetaContexts.Count > 0 && Style != NbdHeaderStyle.Compact)
        {
            var data = new List<byte>();
            AppendU32(data, (uint)name.Length);
            data.AddRange(name);
            AppendU32(data, (uint)_options.MetaContexts.Count);
            foreach (string context in _options.MetaContexts)
            {
                byte[] c = Encoding.UTF8.GetBytes(context);
                AppendU32(data, (uint)c.Length);
                data.AddRange(c);
            }
            await OptionAsync(NbdOption.SetMetaContext, [.. data], ct);
        }
        var go = new List<byte>();
        AppendU32(go, (uint)name.Length);
        go.AddRange(name);
        go.Add(0);
        go.Add(0);
        var goReply = await OptionAsync(NbdOption.Go, [.. go], ct);
        if (goReply != NbdOptionReplyType.Ack)
            throw new NbdProtocolException($"NBD server refused NBD_OPT_GO for export '{_options.ExportName}': {goReply}");
    }

    private static void AppendU32(List<byte> list, uint value)
    {
        list.Add((byte)(value >> 24));
        list.Add((byte)(value >> 16));
        list.Add((byte)(value >> 8));
        list.Add((byte)value);
    }

    private async Task<NbdOptionReplyType> OptionAsync(NbdOption option, byte[] data, CancellationToken ct)
    {
        var header = new byte[NbdHandshake.OptionHeaderLength];
        NbdHandshake.WriteOptionHeader(header, option, data.Length);
        await _stream.WriteAsync(header, ct);
        await _stream.WriteAsync(data, ct);
        while (true)
        {
            var buffered = _input.Buffered;
            long at = _input.Position;
            if (!NbdHandshake.TryReadOptionReply(ref buffered, at, out var reply))
            {
                await FillAsync($"reply to {option}", ct);
                continue;
            }
            if (reply.Option != option)
                throw NbdProtocolException.At("server", at + 8, $"reply names option {(uint)reply.Option} but {option} was asked");
            if (reply.Type == NbdOptionReplyType.Info && NbdHandshake.TryParseExportInfo(reply.Data, at + 20, out ulong size, out var flags))
            {
                ExportSize = size;
                TransmissionFlags = flags;
            }
            if (reply.Type == NbdOptionReplyType.MetaContext)
            {
                var r = new SequenceReader<byte>(reply.Data);
                r.TryReadBigEndian(out int id);
                _metaContexts[(uint)id] = Encoding.UTF8.GetString(reply.Data.Slice(4));
            }
            var type = reply.Type;
            bool final = reply.IsFinal;
            _input.ConsumeTo(buffered);
            if (final)
                return type;
        }
    }

    /// <summary>Sends raw bytes (tests use this for malformed requests).</summary>
    public async Task SendRawAsync(ReadOnlyMemory<byte> bytes, CancellationToken ct)
    {
        await _stream.WriteAsync(bytes, ct);
        await _stream.FlushAsync(ct);
    }

    /// <summary>Sends one request without waiting for its reply; returns its cookie.</summary>
    public async Task<ulong> SendRequestAsync(NbdCommand command, NbdCommandFlags flags, ulong offset, ulong length, ReadOnlyMemory<byte> payload, CancellationToken ct)
    {
        ulong cookie = _nextCookie++;
        int n = NbdRequest.WriteHeader(_header, Style == NbdHeaderStyle.Extended, flags, command, cookie, offset, length);
        await _stream.WriteAsync(_header.AsMemory(0, n), ct);
        if (!payload.IsEmpty)
            await _stream.WriteAsync(payload, ct);
        await _stream.FlushAsync(ct);
        return cookie;
    }

    /// <summary>
    /// Reads the complete reply to one request (all chunks). READ data lands in
    /// <paramref name="readBuffer"/> (holes as zeroes). Returns the cookie and errno (0 = success).
    /// </summary>
    public async Task<(ulong Cookie, uint Error)> ReadReplyAsync(Memory<byte> readBuffer, ulong readOffset, CancellationToken ct)
    {
        uint error = 0;
        while (true)
        {
            long at = _input.Position;
            if (!NbdReplyHeader.TryPeek(_input.Buffered, Style, _options.MaxRequest + 1024, at, out var reply))
            {
                await FillAsync("reply", ct);
                continue;
            }
            long payload = reply.Kind == NbdReplyKind.Simple ? (reply.Error == 0 ? readBuffer.Length : 0) : (long)reply.PayloadLength;
            if (!await _input.EnsureAsync(reply.HeaderLength + (int)payload, ct))
                throw NbdProtocolException.At("server", at, "stream ended inside a reply");
            var body = _input.Buffered.Slice(reply.HeaderLength, payload);
            if (reply.Kind == NbdReplyKind.Simple)
            {
                error = reply.Error;
                if (error == 0)
                    body.CopyTo(readBuffer.Span);
            }
            else if (reply.IsErrorChunk)
            {
                error = NbdReplyHeader.ParseChunkError(body, at + reply.HeaderLength);
            }
            else if (reply.ChunkType == NbdReplyChunkType.OffsetData)
            {
                var r = new SequenceReader<byte>(body);
                r.TryReadBigEndian(out long dataOffset);
                long rel = dataOffset - (long)readOffset;
                if (rel < 0 || rel + (body.Length - 8) > readBuffer.Length)
                    throw NbdProtocolException.At("server", at, $"data chunk at {dataOffset} outside the read");
                body.Slice(8).CopyTo(readBuffer.Span[(int)rel..]);
            }
            else if (reply.ChunkType == NbdReplyChunkType.OffsetHole)
            {
                var r = new SequenceReader<byte>(body);
                r.TryReadBigEndian(out long holeOffset);
                r.TryReadBigEndian(out int holeLength);
                long rel = holeOffset - (long)readOffset;
                if (rel < 0 || rel + (uint)holeLength > readBuffer.Length)
                    throw NbdProtocolException.At("server", at, $"hole chunk at {holeOffset} outside the read");
                readBuffer.Span.Slice((int)rel, holeLength).Clear();
            }
            ulong cookie = reply.Cookie;
            bool last = reply.IsLast;
            _input.Consume(reply.HeaderLength + payload);
            if (last)
                return (cookie, error);
        }
    }

    /// <summary>Reads <paramref name="destination"/>.Length bytes at <paramref name="offset"/>.</summary>
    public async Task ReadAsync(ulong offset, Memory<byte> destination, CancellationToken ct)
    {
        await SendRequestAsync(NbdCommand.Read, NbdCommandFlags.None, offset, (ulong)destination.Length, ReadOnlyMemory<byte>.Empty, ct);
        var (_, error) = await ReadReplyAsync(destination, offset, ct);
        if (error != 0)
            throw new IOException($"NBD READ at {offset} length {destination.Length} failed: errno {error}");
    }

    /// <summary>Runs one request without data and returns its errno.</summary>
    public async Task<uint> CommandAsync(NbdCommand command, NbdCommandFlags flags, ulong offset, ulong length, ReadOnlyMemory<byte> payload, CancellationToken ct)
    {
        await SendRequestAsync(command, flags, offset, length, payload, ct);
        var (_, error) = await ReadReplyAsync(Memory<byte>.Empty, offset, ct);
        return error;
    }

    /// <summary>Sends NBD_CMD_DISC.</summary>
    public async Task DisconnectAsync(CancellationToken ct) =>
        await SendRequestAsync(NbdCommand.Disconnect, NbdCommandFlags.None, 0, 0, ReadOnlyMemory<byte>.Empty, ct);

    private async ValueTask FillAsync(string waitingFor, CancellationToken ct)
    {
        if (!await _input.FillAsync(ct))
            throw NbdProtocolException.At("server", _input.Position, $"stream ended while waiting for the {waitingFor}");
    }

    /// <summary>Releases the receive buffer (the stream belongs to the caller).</summary>
    public ValueTask DisposeAsync()
    {
        _input.Dispose();
        return ValueTask.CompletedTask;
    }
}
