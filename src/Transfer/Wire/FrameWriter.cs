using System.Buffers;
using System.Buffers.Binary;
using System.Diagnostics;
using BFMig.Native.Compression;

namespace BFMig.Transfer.Wire;

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

    /// <summary>Writes one frame; compressed if <paramref name="compress"/> and the policy agrees.</summary>
    public async ValueTask WriteAsync(FrameType type, ReadOnlyMemory<byte> payload, bool compress, CancellationToken ct)
    {
        if (payload.Length > FrameCodec.MaxPayload)
            throw new ArgumentOutOfRangeException(nameof(payload), $"frame payload of {payload.Length} bytes exceeds {FrameCodec.MaxPayload}");
        await _lock.WaitAsync(ct);
        try
        {
            int length = Encode(type, payload.Span, compress);
            long start = Stopwatch.GetTimestamp();
            await _stream.WriteAsync(_buffer.AsMemory(0, length), ct);
            _policy.RecordSend(length, Stopwatch.GetElapsedTime(start));
            BytesWritten += length;
            PayloadBytes += payload.Length;
        }
        finally
        {
            _lock.Release();
        }
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

    private int Encode(FrameType type, ReadOnlySpan<byte> payload, bool compress)
    {
        var codec = compress && payload.Length >= 256 ? _policy.Choose(payload) : FrameCodecKind.None;
        var body = _buffer.AsSpan(FrameCodec.HeaderLength);
        if (codec != FrameCodecKind.None)
        {
            long start = Stopwatch.GetTimestamp();
            int n = codec == FrameCodecKind.Zstd
                ? _zstd.Compress(payload, body[4..])
                : Lz4Codec.Compress(payload, body[4..]);
            _policy.RecordCompression(codec, payload.Length, n, Stopwatch.GetElapsedTime(start));
            if (n + 4 < payload.Length)
            {
                BinaryPrimitives.WriteUInt32BigEndian(body, (uint)payload.Length);
                FrameCodec.WriteHeader(_buffer, type, codec, n + 4);
                return FrameCodec.HeaderLength + n + 4;
            }
        }
        payload.CopyTo(body);
        FrameCodec.WriteHeader(_buffer, type, FrameCodecKind.None, payload.Length);
        return FrameCodec.HeaderLength + payload.Length;
    }

    /// <inheritdoc/>
    public void Dispose()
    {
        _zstd.Dispose();
        ArrayPool<byte>.Shared.Return(_buffer);
        _lock.Dispose();
    }
}
