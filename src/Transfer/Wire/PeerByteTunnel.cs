using BFMig.Transfer.Disk;

namespace BFMig.Transfer.Wire;

/// <summary>
/// A byte stream carried in <see cref="FrameType.Tunnel"/> frames over the peer connection, both
/// ways: what is written here comes out of the peer's tunnel, compressed on the wire when that
/// pays. <see cref="ShutdownWriteAsync"/> (or disposing) sends EOF; reads return 0 after the peer's EOF.
/// This is the upstream an <see cref="BFMig.Transfer.Disk.IDiskStreamFilter"/> writes NBD requests into.
/// </summary>
public sealed class PeerByteTunnel : Stream, IPeerTunnel
{
    private const int MaxChunk = 256 << 10;
    private readonly FrameReader _reader;
    private readonly FrameWriter _writer;
    private readonly bool _compress;
    private ReadOnlyMemory<byte> _pending;
    private bool _readEof;
    private bool _writeEof;

    private readonly Action<long>? _onProgress;

    /// <param name="reader">The peer connection's frames in.</param>
    /// <param name="writer">The peer connection's frames out.</param>
    /// <param name="compress">Compress tunnel frames when that pays.</param>
    /// <param name="onProgress">Takes the peer's Progress reports (a paced sender's return path); without it such a frame is a protocol error.</param>
    public PeerByteTunnel(FrameReader reader, FrameWriter writer, bool compress = true, Action<long>? onProgress = null)
    {
        _onProgress = onProgress;
        _reader = reader;
        _writer = writer;
        _compress = compress;
    }

    /// <summary>Bytes written into the tunnel.</summary>
    public long BytesWritten { get; private set; }

    /// <summary>Bytes read out of the tunnel.</summary>
    public long BytesRead { get; private set; }

    public override bool CanRead => true;
    public override bool CanWrite => true;
    public override bool CanSeek => false;
    public override long Length => throw new NotSupportedException();
    public override long Position { get => throw new NotSupportedException(); set => throw new NotSupportedException(); }

    public override async ValueTask<int> ReadAsync(Memory<byte> buffer, CancellationToken cancellationToken = default)
    {
        while (_pending.IsEmpty)
        {
            if (_readEof) return 0;
            var frame = await _reader.ReadAsync(cancellationToken)
                ?? throw new PeerProtocolException("peer closed the connection without ending the tunnel");
            switch (frame.Type)
            {
                case FrameType.Tunnel:
                    _pending = frame.Payload;
                    break;
                case FrameType.TunnelEof:
                    _readEof = true;
                    break;
                case FrameType.Progress when _onProgress is not null:
                    _onProgress(ProgressMessage.Decode(frame.Payload.Span).Delivered);
                    break;
                case FrameType.Abort:
                    throw new PeerAbortedException(Handshake.AbortReason(frame.Payload.Span));
                default:
                    throw new PeerProtocolException($"unexpected {frame.Type} frame in a tunnel at byte {_reader.BytesRead}");
            }
        }
        int n = Math.Min(buffer.Length, _pending.Length);
        _pending[..n].CopyTo(buffer);
        _pending = _pending[n..];
        BytesRead += n;
        return n;
    }

    public override async ValueTask WriteAsync(ReadOnlyMemory<byte> buffer, CancellationToken cancellationToken = default)
    {
        if (_writeEof) throw new InvalidOperationException("tunnel already shut down for writing");
        while (!buffer.IsEmpty)
        {
            int n = Math.Min(buffer.Length, MaxChunk);
            await _writer.WriteAsync(FrameType.Tunnel, buffer[..n], _compress, cancellationToken);
            BytesWritten += n;
            buffer = buffer[n..];
        }
    }

    /// <summary>Sends EOF to the peer (once).</summary>
    public async ValueTask ShutdownWriteAsync(CancellationToken ct = default)
    {
        if (_writeEof) return;
        _writeEof = true;
        await _writer.WriteAsync(FrameType.TunnelEof, ReadOnlyMemory<byte>.Empty, compress: false, ct);
        await _writer.FlushAsync(ct);
    }

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
}
