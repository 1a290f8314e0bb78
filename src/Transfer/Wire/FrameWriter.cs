using System.Buffers;
using System.Buffers.Binary;
using System.Diagnostics;
using System.Runtime.InteropServices;
using BFMig.Native.Compression;

namespace BFMig.Transfer.Wire;

/// <summary>What <see cref="FrameWriter.Encode"/> produced: the frame's length on the wire, and whether its payload stays in the caller's buffer.</summary>
internal readonly record struct EncodedFrame(int Length, bool Detached);

/// <summary>
/// Writes frames to the peer, compressing payloads per <see cref="CompressionPolicy"/>. Thread-safe:
/// both directions of a helper may write (data one way, control the other).
/// </summary>
public sealed class FrameWriter : IDisposable
{
    private readonly Stream _stream;
    private readonly SemaphoreSlim _lock = new(1, 1);
    private readonly ZstdCodec _zstd;
    private readonly byte[] _buffer;
    private readonly CompressionPolicy _policy;
    private FrameSealer? _sealer;

    public FrameWriter(Stream stream, CompressionMode mode = CompressionMode.Auto, int zstdLevel = 1)
    {
        _stream = stream;
        _policy = new CompressionPolicy(mode);
        _zstd = new ZstdCodec(zstdLevel);
        _buffer = ArrayPool<byte>.Shared.Rent(FrameCodec.HeaderLength + FrameCodec.MaxWireLength);
    }

    /// <summary>Bytes written to the peer so far (headers included).</summary>
    public long BytesWritten { get; private set; }

    /// <summary>Payload bytes before compression.</summary>
    public long PayloadBytes { get; private set; }

    /// <summary>
    /// A paced sender waited <paramref name="waited"/> after writing <paramref name="wireBytes"/>
    /// since its last wait. Its writes then rarely block, so this is where a slow link shows:
    /// the compression policy counts it as link time.
    /// </summary>
    public void RecordLinkWait(long wireBytes, TimeSpan waited) => _policy.RecordSend((int)Math.Min(wireBytes, int.MaxValue), waited);

    /// <summary>
    /// Seals every frame written from now on (<see cref="FrameSealer"/>); called once, by the
    /// handshake, right after its last clear frame and before anything else writes.
    /// </summary>
    public void Protect(FrameSealer sealer)
    {
        if (_sealer is not null) throw new InvalidOperationException("frames are already sealed");
        _sealer = sealer;
    }

    /// <summary>True once frames are sealed.</summary>
    public bool IsProtected => _sealer is not null;

    /// <summary>Writes one frame; compressed if <paramref name="compress"/> and the policy agrees.</summary>
    public async ValueTask WriteAsync(FrameType type, ReadOnlyMemory<byte> payload, bool compress, CancellationToken ct)
    {
        if (payload.Length > FrameCodec.MaxPayload)
            throw new ArgumentOutOfRangeException(nameof(payload), $"frame payload of {payload.Length} bytes exceeds {FrameCodec.MaxPayload}");
        await _lock.WaitAsync(ct);
        try
        {
            var frame = Encode(type, payload.Span, compress, _buffer, _zstd);
            await WriteLockedAsync(frame, payload, ct);
        }
        finally
        {
            _lock.Release();
        }
    }

    /// <summary>
    /// Writes a frame that <see cref="Encode"/> prepared in <paramref name="encoded"/> from
    /// <paramref name="payload"/> (frames are written whole, in call order).
    /// </summary>
    internal async ValueTask WriteEncodedAsync(EncodedFrame frame, ReadOnlyMemory<byte> encoded, ReadOnlyMemory<byte> payload, CancellationToken ct)
    {
        await _lock.WaitAsync(ct);
        try
        {
            if (_sealer is not null)
            {
                // Sealed in write order (the sequence number is the nonce); a detached payload is
                // encrypted from its own buffer straight into the frame buffer, so no extra copy.
                var body = MemoryMarshal.AsMemory(encoded);
                frame = Seal(body.Span, frame, frame.Detached ? payload.Span : body.Span.Slice(FrameCodec.HeaderLength, frame.Length - FrameCodec.HeaderLength));
            }
            long start = Stopwatch.GetTimestamp();
            if (frame.Detached)
            {
                await _stream.WriteAsync(encoded[..FrameCodec.HeaderLength], ct);
                await _stream.WriteAsync(payload, ct);
            }
            else
            {
                await _stream.WriteAsync(encoded[..frame.Length], ct);
            }
            lock (_policy) _policy.RecordSend(frame.Length, Stopwatch.GetElapsedTime(start));
            BytesWritten += frame.Length;
            PayloadBytes += payload.Length;
        }
        finally
        {
            _lock.Release();
        }
    }

    private async ValueTask WriteLockedAsync(EncodedFrame frame, ReadOnlyMemory<byte> payload, CancellationToken ct)
    {
        if (_sealer is not null)
            frame = Seal(_buffer, frame, _buffer.AsSpan(FrameCodec.HeaderLength, frame.Length - FrameCodec.HeaderLength));
        long start = Stopwatch.GetTimestamp();
        await _stream.WriteAsync(_buffer.AsMemory(0, frame.Length), ct);
        lock (_policy) _policy.RecordSend(frame.Length, Stopwatch.GetElapsedTime(start));
        BytesWritten += frame.Length;
        PayloadBytes += payload.Length;
    }

    /// <summary>Flushes the underlying stream.</summary>
    public async ValueTask FlushAsync(CancellationToken ct)
    {
        await _lock.WaitAsync(ct);
        try
        {
            await _stream.FlushAsync(ct);
        }
        finally
        {
            _lock.Release();
        }
    }

    /// <summary>
    /// Encodes a frame into <paramref name="destination"/> (header + payload, compressed when
    /// <paramref name="compress"/> and the policy agrees), with <paramref name="zstd"/> as the
    /// caller's own context. With <paramref name="detach"/>, a large payload sent as is is not
    /// copied: only its header is encoded and the payload follows from its own buffer.
    /// Thread-safe (the policy is shared, the buffers and context are the caller's).
    /// </summary>
    internal EncodedFrame Encode(FrameType type, ReadOnlySpan<byte> payload, bool compress, Span<byte> destination, ZstdCodec zstd, bool detach = false)
    {
        FrameCodecKind codec;
        if (!compress || payload.Length < 256) codec = FrameCodecKind.None;
        else lock (_policy) codec = _policy.Choose(payload);
        var body = destination[FrameCodec.HeaderLength..];
        if (codec != FrameCodecKind.None)
        {
            long start = Stopwatch.GetTimestamp();
            int n = codec == FrameCodecKind.Zstd
                ? zstd.Compress(payload, body[4..])
                : Lz4Codec.Compress(payload, body[4..]);
            var elapsed = Stopwatch.GetElapsedTime(start);
            lock (_policy) _policy.RecordCompression(codec, payload.Length, n, elapsed);
            if (n + 4 < payload.Length)
            {
                BinaryPrimitives.WriteUInt32BigEndian(body, (uint)payload.Length);
                FrameCodec.WriteHeader(destination, type, codec, n + 4);
                return new EncodedFrame(FrameCodec.HeaderLength + n + 4, Detached: false);
            }
        }
        FrameCodec.WriteHeader(destination, type, FrameCodecKind.None, payload.Length);
        if (detach && payload.Length >= DetachThreshold) return new EncodedFrame(FrameCodec.HeaderLength + payload.Length, Detached: true);
        payload.CopyTo(body);
        return new EncodedFrame(FrameCodec.HeaderLength + payload.Length, Detached: false);
    }

    // Seals the frame encoded in `frame` (header at its start) whose wire payload is `plain`
    // (inside `frame` or, for a detached frame, its own buffer): the header's length grows by the
    // tag, the ciphertext and tag land in `frame` after the header. Caller holds the lock.
    private EncodedFrame Seal(Span<byte> destination, EncodedFrame frame, ReadOnlySpan<byte> plain)
    {
        int length = plain.Length;
        var header = FrameCodec.ParseHeader(destination, BytesWritten);
        FrameCodec.WriteHeader(destination, header.Type, header.Codec, length + FrameSealer.TagLength);
        var body = destination.Slice(FrameCodec.HeaderLength, length);
        _sealer!.Seal(destination[..FrameCodec.HeaderLength], plain, body, destination.Slice(FrameCodec.HeaderLength + length, FrameSealer.TagLength));
        return new EncodedFrame(FrameCodec.HeaderLength + length + FrameSealer.TagLength, Detached: false);
    }

    /// <summary>Uncompressed payloads from this size on go out from their own buffer (a second write costs less than the copy).</summary>
    internal const int DetachThreshold = 64 << 10;

    /// <summary>A zstd context at this writer's level, for <see cref="Encode"/> on another thread.</summary>
    internal ZstdCodec NewZstdContext() => new(_zstd.Level);

    /// <inheritdoc/>
    public void Dispose()
    {
        _zstd.Dispose();
        _sealer?.Dispose();
        ArrayPool<byte>.Shared.Return(_buffer);
        _lock.Dispose();
    }
}
