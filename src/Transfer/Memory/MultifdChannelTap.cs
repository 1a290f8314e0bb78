namespace BFMig.Transfer.Memory;

/// <summary>
/// Reads a multifd channel through to the tunnel that carries it byte for byte and parses what
/// passes (<see cref="MultifdChannelParser"/>) on the way, so each channel's stats say what it
/// carried (packets, pages, zero pages) or why the parser could not follow it. Nothing is changed
/// or held back: the parser sees copies, at most one header or page at a time.
/// </summary>
internal sealed class MultifdChannelTap(Stream inner) : Stream
{
    private readonly MultifdFollower _follower = new();

    /// <summary>The parser's view of the channel so far.</summary>
    public MultifdChannelParser Parser => _follower.Parser;

    /// <summary>Feeds bytes that already left (the prefix read before the tunnel started).</summary>
    public void Observe(ReadOnlySpan<byte> bytes) => _follower.Feed(bytes);

    /// <summary>One line for the helper's log: what the channel carried, or where the parser stopped following it.</summary>
    public string Summary()
    {
        var p = Parser;
        var channel = p.Init is { } init ? $"multifd channel {init.ChannelId}" : "multifd channel";
        return p.IsOpaque
            ? $"{channel}: carried byte for byte; the parser stopped following it at byte {p.Position}: {p.OpaqueReason}"
            : $"{channel}: carried byte for byte, {p.Packets} packets, {p.Pages} pages, {p.ZeroPages} zero pages (multifd pages are not elided yet)";
    }

    public override bool CanRead => true;
    public override bool CanSeek => false;
    public override bool CanWrite => inner.CanWrite;
    public override long Length => throw new NotSupportedException();
    public override long Position { get => throw new NotSupportedException(); set => throw new NotSupportedException(); }

    public override async ValueTask<int> ReadAsync(Memory<byte> buffer, CancellationToken cancellationToken = default)
    {
        int n = await inner.ReadAsync(buffer, cancellationToken);
        Observe(buffer.Span[..n]);
        return n;
    }

    public override Task<int> ReadAsync(byte[] buffer, int offset, int count, CancellationToken cancellationToken) =>
        ReadAsync(buffer.AsMemory(offset, count), cancellationToken).AsTask();

    public override int Read(byte[] buffer, int offset, int count) => Read(buffer.AsSpan(offset, count));

    public override int Read(Span<byte> buffer)
    {
        int n = inner.Read(buffer);
        Observe(buffer[..n]);
        return n;
    }

    public override ValueTask WriteAsync(ReadOnlyMemory<byte> buffer, CancellationToken cancellationToken = default) => inner.WriteAsync(buffer, cancellationToken);
    public override Task WriteAsync(byte[] buffer, int offset, int count, CancellationToken cancellationToken) => inner.WriteAsync(buffer, offset, count, cancellationToken);
    public override void Write(byte[] buffer, int offset, int count) => inner.Write(buffer, offset, count);
    public override Task FlushAsync(CancellationToken cancellationToken) => inner.FlushAsync(cancellationToken);
    public override void Flush() => inner.Flush();
    public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();
    public override void SetLength(long value) => throw new NotSupportedException();
}
