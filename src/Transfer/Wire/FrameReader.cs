using System.Buffers;
using BFMig.Native.Compression;

namespace BFMig.Transfer.Wire;

/// <summary>A frame read from the peer; <see cref="Payload"/> is valid until the next read.</summary>
public readonly record struct Frame(FrameType Type, ReadOnlyMemory<byte> Payload);

/// <summary>Reads frames from the peer with bounded buffers, decompressing payloads. One reader per stream direction.</summary>
public sealed class FrameReader : IDisposable
{
    private readonly Stream _stream;
    private readonly byte[] _wire;
    private readonly byte[] _plain;
    private readonly ZstdCodec _zstd = new();
    private FrameSealer? _opener;

    public FrameReader(Stream stream, TimeSpan idleTimeout)
    {
        _stream = stream;
        IdleTimeout = idleTimeout;
        _wire = ArrayPool<byte>.Shared.Rent(FrameCodec.HeaderLength + FrameCodec.MaxWireLength);
        _plain = ArrayPool<byte>.Shared.Rent(FrameCodec.MaxPayload);
    }

    /// <summary>
    /// Opens (authenticates and decrypts) every frame read from now on; called once, by the
    /// handshake, right after the peer's last clear frame.
    /// </summary>
    public void Protect(FrameSealer opener)
    {
        if (_opener is not null) throw new InvalidOperationException("frames are already sealed");
        _opener = opener;
    }

    /// <summary>
    /// How long a read may wait for the peer's next bytes (<see cref="Timeout.InfiniteTimeSpan"/>:
    /// for ever); a change also restarts the wait of a read in progress (another thread may set
    /// it). A channel QEMU may keep silent for the whole trip, or a stream gone post-copy, which
    /// only QEMU may end, waits for ever (a dead peer is then found by TCP keepalive,
    /// <see cref="PeerSockets.KeepAlive"/>).
    /// </summary>
    public TimeSpan IdleTimeout
    {
        get
        {
            lock (_timerGate)
                return _idleTimeout;
        }
        set
        {
            lock (_timerGate)
            {
                _idleTimeout = value;
                // Disposed only under this lock (StopTimer), so it is live here.
                _readTimer?.CancelAfter(value);
            }
        }
    }

    // The idle timeout and the timer of the read in progress: one lock, so that a change either
    // reaches that read's timer or comes before the read starts its own.
    private readonly Lock _timerGate = new();
    private TimeSpan _idleTimeout;
    private CancellationTokenSource? _readTimer;

    private CancellationTokenSource StartTimer(CancellationToken ct)
    {
        var cts = CancellationTokenSource.CreateLinkedTokenSource(ct);
        lock (_timerGate)
        {
            cts.CancelAfter(_idleTimeout);
            _readTimer = cts;
        }
        return cts;
    }

    private void StopTimer(CancellationTokenSource cts)
    {
        lock (_timerGate)
        {
            if (ReferenceEquals(_readTimer, cts)) _readTimer = null;
            cts.Dispose();
        }
    }

    /// <summary>Bytes read from the peer so far.</summary>
    public long BytesRead { get; private set; }

    /// <summary>
    /// Reads the next frame. Returns null on a clean end of stream between frames; throws
    /// <see cref="PeerProtocolException"/> on a malformed frame, a stream cut inside a frame, or
    /// <see cref="TimeoutException"/> when the peer is silent longer than the idle timeout.
    /// </summary>
    public ValueTask<Frame?> ReadAsync(CancellationToken ct) => ReadAsync(plainOnly: false, ct);

    /// <summary>
    /// Reads the next frame of the handshake, before the peer proved anything: every handshake
    /// frame is sent uncompressed, so a compressed one is refused rather than handed to a
    /// decompressor (no native code runs on an unauthenticated peer's bytes).
    /// </summary>
    public ValueTask<Frame?> ReadHandshakeAsync(CancellationToken ct) => ReadAsync(plainOnly: true, ct);

    private async ValueTask<Frame?> ReadAsync(bool plainOnly, CancellationToken ct)
    {
        long offset = BytesRead;
        int got = await ReadAtLeastAsync(_wire.AsMemory(0, FrameCodec.HeaderLength), ct);
        if (got == 0) return null;
        if (got < FrameCodec.HeaderLength)
            throw new PeerProtocolException($"peer stream ended inside a frame header at byte {offset}");
        var header = FrameCodec.ParseHeader(_wire, offset);
        got = await ReadAtLeastAsync(_wire.AsMemory(FrameCodec.HeaderLength, header.WireLength), ct);
        if (got < header.WireLength)
            throw new PeerProtocolException($"peer stream ended inside a {header.Type} frame at byte {offset} ({got} of {header.WireLength} payload bytes)");
        BytesRead += FrameCodec.HeaderLength + header.WireLength;
        var payload = _wire.AsMemory(FrameCodec.HeaderLength, header.WireLength);
        if (_opener is not null)
        {
            payload = Open(header, payload, offset);
            header = header with { WireLength = payload.Length };
        }
        if (header.Codec == FrameCodecKind.None) return new Frame(header.Type, payload);
        if (plainOnly)
            throw new PeerProtocolException($"{header.Type} frame at byte {offset} is compressed ({header.Codec}) during the handshake");
        int plainLength = FrameCodec.UncompressedLength(payload.Span, header, offset);
        int n;
        try
        {
            n = header.Codec == FrameCodecKind.Zstd
                ? _zstd.Decompress(payload.Span[4..], _plain.AsSpan(0, plainLength))
                : Lz4Codec.Decompress(payload.Span[4..], _plain.AsSpan(0, plainLength));
        }
        catch (CompressionException e)
        {
            throw new PeerProtocolException($"{header.Type} frame at byte {offset}: {e.Message}", e);
        }
        if (n != plainLength)
            throw new PeerProtocolException($"{header.Type} frame at byte {offset} decompressed to {n} bytes, header said {plainLength}");
        return new Frame(header.Type, _plain.AsMemory(0, n));
    }

    private Memory<byte> Open(FrameHeader header, Memory<byte> sealedPayload, long offset)
    {
        ulong sequence = _opener!.Sequence;
        if (sealedPayload.Length < FrameSealer.TagLength)
            throw new PeerProtocolException($"sealed {header.Type} frame {sequence} at byte {offset} of {sealedPayload.Length} bytes is shorter than its tag");
        var body = sealedPayload[..^FrameSealer.TagLength];
        if (!_opener.TryOpen(_wire.AsSpan(0, FrameCodec.HeaderLength), body.Span, sealedPayload.Span[^FrameSealer.TagLength..]))
            throw new PeerAuthenticationException($"{header.Type} frame {sequence} at byte {offset} failed authentication: altered, replayed, reordered or dropped on the way, or not sealed with this connection's key");
        if (header.Codec != FrameCodecKind.None && body.Length < 4)
            throw new PeerProtocolException($"compressed {header.Type} frame {sequence} at byte {offset} has no length prefix");
        return body;
    }

    private async ValueTask<int> ReadAtLeastAsync(Memory<byte> buffer, CancellationToken ct)
    {
        var cts = StartTimer(ct);
        int total = 0;
        try
        {
            while (total < buffer.Length)
            {
                int n = await _stream.ReadAsync(buffer[total..], cts.Token);
                if (n == 0) break;
                total += n;
            }
        }
        catch (OperationCanceledException) when (!ct.IsCancellationRequested)
        {
            throw new TimeoutException($"peer sent nothing for {IdleTimeout.TotalSeconds:0} s (at byte {BytesRead + total})");
        }
        finally
        {
            StopTimer(cts);
        }
        return total;
    }

    /// <inheritdoc/>
    public void Dispose()
    {
        ArrayPool<byte>.Shared.Return(_wire);
        ArrayPool<byte>.Shared.Return(_plain);
        _zstd.Dispose();
        _opener?.Dispose();
    }
}
