using System.Buffers.Binary;
using System.Buffers;
using System.Text;
using BFMig.Transfer.Wire;

namespace BFMig.Transfer.Disk;

/// <summary>Chunk types of the disk channel (carried inside the tunnel of an nbd stream with stores on both sides).</summary>
public enum DiskChunk : byte
{
    /// <summary>NBD bytes, in the direction of the chunk.</summary>
    Data = 1,
    /// <summary>This direction's NBD bytes ended.</summary>
    DataEof = 2,
    /// <summary>S->R, before the option that names it is forwarded: <c>16 digest of the sender's saved map, 32 block hash key (<see cref="BFMig.Transfer.Disk.DiskHashKey"/>; secret: the channel runs inside TLS or sealed frames), u8 len + export name, the sender's doubt (<see cref="DiskDoubt.Encode"/>)</c>.</summary>
    ExportHello = 3,
    /// <summary>R->S, before anything the server says about that option: <c>u8 match (1: same saved map, elide outside both doubts) or 0, 16 digest of the map in use (the saved map minus both doubts), the receiver's doubt</c>.</summary>
    ExportReply = 4,
    /// <summary>S->R after both NBD directions ended: <c>u8 clean, 16 digest of the map the sender recorded</c>.</summary>
    End = 5,
    /// <summary>R->S: <c>u8 committed, 16 digest of the map the receiver observed</c>.</summary>
    EndAck = 6,
    /// <summary>R->S, before an <see cref="ExportReply"/> that does not match: a run of the receiver's own map, which it offers instead (<see cref="DiskMapOffer"/>).</summary>
    ExportMap = 7,
}

/// <summary>
/// The disk channel: NBD bytes and a few control messages multiplexed over a
/// <see cref="PeerByteTunnel"/> as chunks of <c>u8 type, be32 length, payload</c>. It lets the two
/// helpers agree on the retained map of the export the client names during the NBD handshake
/// (which is only known then) and confirm the resulting maps at the end. Writes are serialized,
/// so a control message and NBD bytes written from different tasks keep their order.
/// </summary>
public sealed class DiskChannel
{
    /// <summary>Largest chunk payload (one tunnel frame with its header).</summary>
    public const int MaxPayload = (256 << 10) - HeaderLength;
    private const int HeaderLength = 5;

    private readonly PeerByteTunnel _tunnel;
    private readonly SemaphoreSlim _writeLock = new(1, 1);
    private readonly byte[] _header = new byte[HeaderLength];
    private int _dataLeft;
    private bool _dataEof;
    private bool _dataEofSent;

    public DiskChannel(PeerByteTunnel tunnel) => _tunnel = tunnel;

    /// <summary>NBD bytes written into the channel (forward direction on the sender, reverse on the receiver).</summary>
    public long DataBytesWritten { get; private set; }

    /// <summary>NBD bytes read out of the channel.</summary>
    public long DataBytesRead { get; private set; }

    /// <summary>The underlying tunnel.</summary>
    public PeerByteTunnel Tunnel => _tunnel;

    /// <summary>Flushes the tunnel.</summary>
    public Task FlushAsync(CancellationToken ct) => _tunnel.FlushAsync(ct);

    /// <summary>Writes NBD bytes as data chunks.</summary>
    public async ValueTask WriteDataAsync(ReadOnlyMemory<byte> data, CancellationToken ct)
    {
        while (!data.IsEmpty)
        {
            int n = Math.Min(data.Length, MaxPayload);
            await WriteChunkAsync(DiskChunk.Data, data[..n], ct);
            DataBytesWritten += n;
            data = data[n..];
        }
    }

    /// <summary>Ends this side's NBD bytes (once).</summary>
    public async ValueTask WriteDataEofAsync(CancellationToken ct)
    {
        if (_dataEofSent) return;
        _dataEofSent = true;
        await WriteChunkAsync(DiskChunk.DataEof, ReadOnlyMemory<byte>.Empty, ct);
    }

    /// <summary>Writes one chunk (control chunks are flushed at once).</summary>
    public async ValueTask WriteChunkAsync(DiskChunk type, ReadOnlyMemory<byte> payload, CancellationToken ct)
    {
        if (payload.Length > MaxPayload) throw new ArgumentOutOfRangeException(nameof(payload), payload.Length, "chunk payload too long");
        var buffer = ArrayPool<byte>.Shared.Rent(HeaderLength + payload.Length);
        try
        {
            buffer[0] = (byte)type;
            BinaryPrimitives.WriteInt32BigEndian(buffer.AsSpan(1), payload.Length);
            payload.Span.CopyTo(buffer.AsSpan(HeaderLength));
            await _writeLock.WaitAsync(ct);
            try
            {
                await _tunnel.WriteAsync(buffer.AsMemory(0, HeaderLength + payload.Length), ct);
                if (type != DiskChunk.Data)
                    await _tunnel.FlushAsync(ct);
            }
            finally
            {
                _writeLock.Release();
            }
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(buffer);
        }
    }

    /// <summary>
    /// Reads NBD bytes; control chunks met on the way go to <paramref name="onControl"/> (in
    /// stream order, before any later data is returned). Returns 0 after the peer's DataEof.
    /// </summary>
    public async ValueTask<int> ReadDataAsync(Memory<byte> buffer, Func<DiskChunk, byte[], CancellationToken, ValueTask> onControl, CancellationToken ct)
    {
        while (_dataLeft == 0)
        {
            if (_dataEof) return 0;
            var (type, length) = await ReadHeaderAsync(ct);
            switch (type)
            {
                case DiskChunk.Data:
                    _dataLeft = length;
                    break;
                case DiskChunk.DataEof:
                    if (length != 0) throw Bad($"DataEof chunk of {length} bytes");
                    _dataEof = true;
                    break;
                default:
                    var payload = new byte[length];
                    await ReadExactAsync(payload, ct);
                    await onControl(type, payload, ct);
                    break;
            }
        }
        int n = await _tunnel.ReadAsync(buffer[..Math.Min(buffer.Length, _dataLeft)], ct);
        if (n == 0) throw Bad($"tunnel ended inside a data chunk ({_dataLeft} bytes missing)");
        _dataLeft -= n;
        DataBytesRead += n;
        return n;
    }

    /// <summary>Reads the next chunk, which must be a control chunk of <paramref name="expected"/> type (after the peer's DataEof).</summary>
    public async ValueTask<byte[]> ReadControlAsync(DiskChunk expected, CancellationToken ct)
    {
        if (_dataLeft != 0) throw Bad($"{expected} expected but {_dataLeft} NBD bytes are unread");
        var (type, length) = await ReadHeaderAsync(ct);
        if (type != expected) throw Bad($"{expected} chunk expected, got {type}");
        var payload = new byte[length];
        await ReadExactAsync(payload, ct);
        return payload;
    }

    private async ValueTask<(DiskChunk Type, int Length)> ReadHeaderAsync(CancellationToken ct)
    {
        long at = _tunnel.BytesRead;
        await ReadExactAsync(_header, ct);
        var type = (DiskChunk)_header[0];
        int length = BinaryPrimitives.ReadInt32BigEndian(_header.AsSpan(1));
        if (type is < DiskChunk.Data or > DiskChunk.ExportMap) throw Bad($"unknown chunk type {_header[0]} at tunnel byte {at}");
        if (length < 0 || length > MaxPayload || (type != DiskChunk.Data && length > MaxControlLength(type)))
            throw Bad($"{type} chunk of {length} bytes at tunnel byte {at}");
        return (type, length);
    }

    // The hello and its reply carry a doubt of up to DiskDoubt.MaxRanges ranges.
    private static int MaxControlLength(DiskChunk type) => type switch
    {
        DiskChunk.ExportHello or DiskChunk.ExportReply => 1024 + 5 + 16 * DiskDoubt.MaxRanges,
        DiskChunk.ExportMap => MaxPayload,
        _ => 1024,
    };

    private async ValueTask ReadExactAsync(Memory<byte> buffer, CancellationToken ct)
    {
        int got = 0;
        while (got < buffer.Length)
        {
            int n = await _tunnel.ReadAsync(buffer[got..], ct);
            if (n == 0) throw Bad($"tunnel ended inside a chunk at tunnel byte {_tunnel.BytesRead} ({got} of {buffer.Length} bytes)");
            got += n;
        }
    }

    private static PeerProtocolException Bad(string what) => new($"disk channel: {what}");

    /// <summary>Encodes an <see cref="DiskChunk.ExportHello"/> payload.</summary>
    public static byte[] EncodeExportHello(UInt128 digest, DiskHashKey key, string exportName, DiskDoubt doubt)
    {
        var name = Encoding.UTF8.GetBytes(exportName);
        if (name.Length > 255) name = name[..255];
        var tail = doubt.Encode();
        var b = new byte[16 + DiskHashKey.Length + 1 + name.Length + tail.Length];
        BinaryPrimitives.WriteUInt128BigEndian(b, digest);
        key.CopyTo(b.AsSpan(16));
        b[16 + DiskHashKey.Length] = (byte)name.Length;
        name.CopyTo(b.AsSpan(17 + DiskHashKey.Length));
        tail.CopyTo(b.AsSpan(17 + DiskHashKey.Length + name.Length));
        return b;
    }

    /// <summary>Decodes an <see cref="DiskChunk.ExportHello"/> payload.</summary>
    public static (UInt128 Digest, DiskHashKey Key, string ExportName, DiskDoubt Doubt) DecodeExportHello(ReadOnlySpan<byte> p)
    {
        const int fixedLength = 16 + DiskHashKey.Length + 1;
        if (p.Length < fixedLength || p.Length < fixedLength + p[fixedLength - 1]) throw Bad($"export hello of {p.Length} bytes is malformed");
        int nameLength = p[fixedLength - 1];
        var doubt = DiskDoubt.Decode(p[(fixedLength + nameLength)..]) ?? throw Bad($"export hello of {p.Length} bytes has a malformed doubt");
        return (BinaryPrimitives.ReadUInt128BigEndian(p), new DiskHashKey(p.Slice(16, DiskHashKey.Length)), Encoding.UTF8.GetString(p.Slice(fixedLength, nameLength)), doubt);
    }

    /// <summary>Encodes an <see cref="DiskChunk.ExportReply"/> payload.</summary>
    public static byte[] EncodeExportReply(bool match, UInt128 digest, DiskDoubt doubt) => [.. EncodeFlagDigest(match, digest), .. doubt.Encode()];

    /// <summary>Decodes an <see cref="DiskChunk.ExportReply"/> payload.</summary>
    public static (bool Match, UInt128 Digest, DiskDoubt Doubt) DecodeExportReply(ReadOnlySpan<byte> p)
    {
        if (p.Length < 17) throw Bad($"export reply of {p.Length} bytes is malformed");
        var (match, digest) = DecodeFlagDigest(p[..17], "export reply");
        var doubt = DiskDoubt.Decode(p[17..]) ?? throw Bad($"export reply of {p.Length} bytes has a malformed doubt");
        return (match, digest, doubt);
    }

    /// <summary>Encodes a flag + digest payload (<see cref="DiskChunk.ExportReply"/>, <see cref="DiskChunk.End"/>, <see cref="DiskChunk.EndAck"/>).</summary>
    public static byte[] EncodeFlagDigest(bool flag, UInt128 digest)
    {
        var b = new byte[17];
        b[0] = flag ? (byte)1 : (byte)0;
        BinaryPrimitives.WriteUInt128BigEndian(b.AsSpan(1), digest);
        return b;
    }

    /// <summary>Decodes a flag + digest payload; <paramref name="what"/> names it in errors.</summary>
    public static (bool Flag, UInt128 Digest) DecodeFlagDigest(ReadOnlySpan<byte> p, string what)
    {
        if (p.Length != 17 || p[0] > 1) throw Bad($"{what} of {p.Length} bytes (first 0x{(p.Length > 0 ? p[0] : 0):x2}) is malformed");
        return (p[0] == 1, BinaryPrimitives.ReadUInt128BigEndian(p[1..]));
    }
}
