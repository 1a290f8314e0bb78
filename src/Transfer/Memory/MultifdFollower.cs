namespace BFMig.Transfer.Memory;

/// <summary>
/// Follows a multifd channel that arrives in pieces of any size: keeps the piece of a header or
/// page that a chunk cut (at most <see cref="MultifdChannelParser.MaxSegmentLength"/> bytes) until
/// the rest comes, and hands every complete segment to the caller. The tap (stats only) and the
/// receiver's <see cref="MultifdDecoder"/> (which must know where each rebuilt page belongs) both
/// follow channels this way.
/// </summary>
internal sealed class MultifdFollower
{
    private readonly byte[] _pending = new byte[MultifdChannelParser.MaxSegmentLength];
    private int _pendingLength;

    /// <summary>The parser's view of the channel so far.</summary>
    public MultifdChannelParser Parser { get; } = new();

    /// <summary>True when no cut segment waits for its rest.</summary>
    public bool AtSegmentBoundary => _pendingLength == 0;

    /// <summary>Feeds <paramref name="bytes"/>; <paramref name="onSegment"/> sees each complete segment (raw bytes of an opaque channel are not reported).</summary>
    public void Feed(ReadOnlySpan<byte> bytes, Action<MultifdSegment>? onSegment = null)
    {
        while (!bytes.IsEmpty && !Parser.IsOpaque)
        {
            if (_pendingLength == 0 && Parser.TryRead(bytes, isFinal: false, out var whole))
            {
                onSegment?.Invoke(whole);
                bytes = bytes[whole.Length..];
                continue;
            }
            int take = Math.Min(bytes.Length, _pending.Length - _pendingLength);
            bytes[..take].CopyTo(_pending.AsSpan(_pendingLength));
            _pendingLength += take;
            bytes = bytes[take..];
            while (_pendingLength > 0 && Parser.TryRead(_pending.AsSpan(0, _pendingLength), isFinal: false, out var s))
            {
                if (s.Kind != MultifdSegmentKind.Raw) onSegment?.Invoke(s);
                _pending.AsSpan(s.Length, _pendingLength - s.Length).CopyTo(_pending);
                _pendingLength -= s.Length;
            }
        }
    }

    /// <summary>The channel ended: a segment cut short makes the parser say where (it goes opaque).</summary>
    public void Finish()
    {
        if (_pendingLength > 0 && !Parser.IsOpaque) Parser.TryRead(_pending.AsSpan(0, _pendingLength), isFinal: true, out _);
        _pendingLength = 0;
    }
}
