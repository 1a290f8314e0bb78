using System.Buffers;

namespace BFMig.Transfer.Disk.Nbd;

/// <summary>
/// A contiguous receive buffer over one direction of an NBD connection. Parsers look at
/// <see cref="Buffered"/>, then <see cref="Consume"/> what they used; <see cref="FillAsync"/>
/// reads more. The buffer grows up to <see cref="Capacity"/>, so memory stays bounded whatever
/// the peer sends. <see cref="Position"/> is the stream offset of the first buffered byte, for
/// error messages.
/// </summary>
public sealed class NbdInput : IDisposable
{
    private readonly Stream _stream;
    private byte[] _buffer;
    private int _start;
    private int _end;

    /// <summary>Creates a reader over <paramref name="stream"/> holding at most <paramref name="capacity"/> bytes.</summary>
    public NbdInput(Stream stream, string name, int capacity)
    {
        _stream = stream;
        Name = name;
        Capacity = capacity;
        _buffer = ArrayPool<byte>.Shared.Rent(Math.Min(capacity, 256 * 1024));
    }

    /// <summary>What this stream is called in errors ("client", "upstream").</summary>
    public string Name { get; }

    /// <summary>Most bytes ever buffered.</summary>
    public int Capacity { get; }

    /// <summary>Stream offset of the first buffered byte.</summary>
    public long Position { get; private set; }

    /// <summary>True once the peer closed its side.</summary>
    public bool Completed { get; private set; }

    /// <summary>The buffered, not yet consumed bytes.</summary>
    public ReadOnlyMemory<byte> BufferedMemory => _buffer.AsMemory(_start, _end - _start);

    /// <summary>The buffered bytes as a sequence, for the codec.</summary>
    public ReadOnlySequence<byte> Buffered => new(_buffer, _start, _end - _start);

    /// <summary>Drops <paramref name="count"/> bytes from the front.</summary>
    public void Consume(long count)
    {
        if (count < 0 || count > _end - _start)
            throw new ArgumentOutOfRangeException(nameof(count));
        _start += (int)count;
        Position += count;
        if (_start == _end)
            _start = _end = 0;
    }

    /// <summary>Consumes everything before <paramref name="rest"/>, the remainder a parser left of <see cref="Buffered"/>.</summary>
    public void ConsumeTo(ReadOnlySequence<byte> rest) => Consume((_end - _start) - rest.Length);

    /// <summary>
    /// Reads more bytes. Returns false at end of stream. Throws when the buffer is full at
    /// capacity (a message larger than any limit should have been rejected by the parser first).
    /// </summary>
    public async ValueTask<bool> FillAsync(CancellationToken cancellationToken)
    {
        if (Completed)
            return false;
        if (_end == _buffer.Length)
            MakeRoom();
        int n = await _stream.ReadAsync(_buffer.AsMemory(_end), cancellationToken);
        if (n == 0)
        {
            Completed = true;
            return false;
        }
        _end += n;
        return true;
    }

    /// <summary>Fills until at least <paramref name="count"/> bytes are buffered; false on end of stream first.</summary>
    public async ValueTask<bool> EnsureAsync(int count, CancellationToken cancellationToken)
    {
        while (_end - _start < count)
        {
            if (!await FillAsync(cancellationToken))
                return false;
        }
        return true;
    }

    private void MakeRoom()
    {
        int used = _end - _start;
        if (_start > 0 && used < _buffer.Length / 2)
        {
            Buffer.BlockCopy(_buffer, _start, _buffer, 0, used);
            _start = 0;
            _end = used;
            return;
        }
        if (_buffer.Length >= Capacity)
        {
            if (_start > 0)
            {
                Buffer.BlockCopy(_buffer, _start, _buffer, 0, used);
                _start = 0;
                _end = used;
                return;
            }
            throw NbdProtocolException.At(Name, Position, $"message exceeds the buffer limit of {Capacity} bytes");
        }
        var bigger = ArrayPool<byte>.Shared.Rent((int)Math.Min((long)_buffer.Length * 2, Capacity));
        Buffer.BlockCopy(_buffer, _start, bigger, 0, used);
        ArrayPool<byte>.Shared.Return(_buffer);
        _buffer = bigger;
        _start = 0;
        _end = used;
    }

    /// <summary>Returns the buffer to the pool.</summary>
    public void Dispose()
    {
        var buffer = Interlocked.Exchange(ref _buffer, []);
        if (buffer.Length > 0)
            ArrayPool<byte>.Shared.Return(buffer);
    }
}
