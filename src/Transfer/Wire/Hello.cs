using System.Buffers.Binary;
using System.Text;
using BFMig.Transfer.Memory;

namespace BFMig.Transfer.Wire;

/// <summary>Which stream a connection carries.</summary>
public enum StreamKind : byte
{
    Mig = 1,
    Nbd = 2,
    /// <summary>A daemon-to-daemon control exchange (checkpoint metadata), answered by bfmigd itself.</summary>
    Control = 3,
}

/// <summary>
/// Sender's hello (frame <see cref="FrameType.Hello"/>):
/// <c>"BFMG" u16 version, u8 kind, u8 flags (1 = wants store, 2 = paced, 4 = multifd channel, 8 = coded channel, 16 = quiet channel), 16 guest uuid (RFC 4122 byte
/// order), be64 generation, 16 digest, be64 seed, 32 nonce, u8 name length + sender host name</c>.
/// Generation and digest are what the sender believes the receiver holds.
/// </summary>
public sealed record Hello(StreamKind Kind, bool WantsStore, Guid Guest, ulong Generation, byte[] Digest, ulong Seed, byte[] Nonce, string SenderName)
{
    private const byte WantsStoreFlag = 1;
    private const byte PacedFlag = 2;
    private const byte MultifdChannelFlag = 4;
    private const byte CodedChannelFlag = 8;
    private const byte QuietChannelFlag = 16;
    private const ushort QuietChannelVersion = 10;
    private const byte KnownFlags = WantsStoreFlag | PacedFlag | MultifdChannelFlag | CodedChannelFlag | QuietChannelFlag;
    private static ReadOnlySpan<byte> Magic => "BFMG"u8;

    /// <summary>
    /// The sender paces a memory stream by what the receiving QEMU has taken, so the receiver
    /// reports it (<see cref="FrameType.Progress"/>).
    /// </summary>
    public bool Paced { get; init; }

    /// <summary>
    /// The stream is one of QEMU's multifd channels (<c>--parallel</c>), not the main migration
    /// stream: the receiver connects it to its QEMU only after the main channel (QEMU 7.2 takes
    /// the first connection for the main one, see <see cref="MainChannelGate"/>).
    /// </summary>
    public bool MultifdChannel { get; init; }

    /// <summary>A multifd channel whose pages come coded against the guest's store (<see cref="FrameType.MultifdData"/>): the receiver must rebuild them through its main stream's helper.</summary>
    public bool CodedChannel { get; init; }

    /// <summary>
    /// A memory connection that followed its guest's main stream and on which QEMU sent nothing:
    /// QEMU's post-copy preempt channel (QEMU 10 with libvirt 11 opens one when the trip switches
    /// to post-copy, and writes to it only the pages the destination faults on). Carried byte for
    /// byte, without a store, and with no idle timeout on either side: it may stay silent for the
    /// whole post-copy phase, and the destination QEMU waits for it before it runs the guest.
    /// </summary>
    public bool QuietChannel { get; init; }

    /// <summary>
    /// The protocol version the hello is written in: this helper's for one it sends, the peer's
    /// for one it decoded (any of <see cref="FrameCodec.OldestPeerVersion"/> to
    /// <see cref="FrameCodec.ProtocolVersion"/>), so that a decoded hello encodes to its own bytes.
    /// </summary>
    public ushort Version { get; init; } = FrameCodec.ProtocolVersion;

    public byte[] Encode()
    {
        var name = Encoding.UTF8.GetBytes(SenderName);
        if (name.Length > 255) throw new ArgumentException("sender name longer than 255 bytes");
        var b = new byte[4 + 2 + 1 + 1 + 16 + 8 + 16 + 8 + 32 + 1 + name.Length];
        var s = b.AsSpan();
        Magic.CopyTo(s);
        BinaryPrimitives.WriteUInt16BigEndian(s[4..], Version);
        s[6] = (byte)Kind;
        s[7] = (byte)((WantsStore ? WantsStoreFlag : 0) | (Paced ? PacedFlag : 0) | (MultifdChannel ? MultifdChannelFlag : 0) | (CodedChannel ? CodedChannelFlag : 0) | (QuietChannel ? QuietChannelFlag : 0));
        Guest.TryWriteBytes(s[8..], bigEndian: true, out _);
        BinaryPrimitives.WriteUInt64BigEndian(s[24..], Generation);
        Digest.AsSpan(0, 16).CopyTo(s[32..]);
        BinaryPrimitives.WriteUInt64BigEndian(s[48..], Seed);
        Nonce.AsSpan(0, 32).CopyTo(s[56..]);
        s[88] = (byte)name.Length;
        name.CopyTo(s[89..]);
        return b;
    }

    public static Hello Decode(ReadOnlySpan<byte> p)
    {
        if (p.Length < 89) throw new PeerProtocolException($"hello of {p.Length} bytes is shorter than 89");
        if (!p[..4].SequenceEqual(Magic)) throw new PeerProtocolException($"hello magic {Convert.ToHexString(p[..4])} is not BFMG");
        ushort version = BinaryPrimitives.ReadUInt16BigEndian(p[4..]);
        FrameCodec.RequirePeerVersion(version);
        byte kind = p[6];
        if (kind is not ((byte)StreamKind.Mig or (byte)StreamKind.Nbd or (byte)StreamKind.Control)) throw new PeerProtocolException($"hello names unknown stream kind {kind}");
        if ((p[7] & ~KnownFlags) != 0) throw new PeerProtocolException($"hello has unknown flags 0x{p[7]:x2}");
        if ((p[7] & (MultifdChannelFlag | CodedChannelFlag)) == CodedChannelFlag) throw new PeerProtocolException("hello marks a coded channel that is not a multifd channel");
        if ((p[7] & QuietChannelFlag) != 0 && (kind != (byte)StreamKind.Mig || (p[7] & ~QuietChannelFlag) != 0))
            throw new PeerProtocolException($"hello marks a quiet channel that is not a plain memory stream (kind {kind}, flags 0x{p[7]:x2})");
        if ((p[7] & QuietChannelFlag) != 0 && version < QuietChannelVersion)
            throw new PeerProtocolException($"hello of protocol version {version} marks a quiet channel (version {QuietChannelVersion} on)");
        int nameLen = p[88];
        if (p.Length != 89 + nameLen) throw new PeerProtocolException($"hello of {p.Length} bytes, expected {89 + nameLen}");
        return new Hello((StreamKind)kind, (p[7] & WantsStoreFlag) != 0, new Guid(p.Slice(8, 16), bigEndian: true), BinaryPrimitives.ReadUInt64BigEndian(p[24..]),
            p.Slice(32, 16).ToArray(), BinaryPrimitives.ReadUInt64BigEndian(p[48..]), p.Slice(56, 32).ToArray(), Encoding.UTF8.GetString(p.Slice(89, nameLen)))
        {
            Version = version,
            Paced = (p[7] & PacedFlag) != 0,
            MultifdChannel = (p[7] & MultifdChannelFlag) != 0,
            CodedChannel = (p[7] & (MultifdChannelFlag | CodedChannelFlag)) == (MultifdChannelFlag | CodedChannelFlag),
            QuietChannel = (p[7] & QuietChannelFlag) != 0,
        };
    }
}

/// <summary>Receiver's answer to a hello.</summary>
public enum HelloStatus : byte
{
    /// <summary>The receiver holds what the sender believes: elide, reference and delta freely.</summary>
    Match = 0,
    /// <summary>The receiver holds something else (or nothing): send every page in full.</summary>
    Mismatch = 1,
    /// <summary>The receiver will not take this stream (wrong guest, busy): see the message.</summary>
    Refused = 2,
}

/// <summary>
/// Receiver's reply (frame <see cref="FrameType.HelloReply"/>): <c>u8 status, u8 flags (1 = store
/// in use, 2 = its page index follows), be64 generation, 16 digest, 32 nonce, u8 message length + message, doubt
/// (<see cref="MemoryDoubt.Encode"/>), u8 proof length + proof</c>. The proof covers the hello and
/// the reply up to the proof. The message says why, for a refusal or a mismatch.
/// </summary>
public sealed record HelloReply(HelloStatus Status, bool HasStore, ulong Generation, byte[] Digest, byte[] Nonce, string Message)
{
    private const byte StoreFlag = 1;
    private const byte IndexFlag = 2;

    /// <summary>The receiver's memory pages in doubt after interrupted trips (a memory stream on a match; none otherwise).</summary>
    public MemoryDoubt Doubt { get; init; } = MemoryDoubt.None;

    /// <summary>
    /// A mismatch on which the receiver still holds an earlier snapshot of the guest: its page
    /// index (<see cref="PeerPageIndex"/>) follows once the sender has proved itself.
    /// </summary>
    public bool IndexFollows { get; init; }

    /// <summary>The bytes the receiver's proof covers (everything but the proof).</summary>
    public byte[] EncodeUnsigned()
    {
        var msg = Encoding.UTF8.GetBytes(Message);
        if (msg.Length > 255) msg = msg[..255];
        var doubt = Doubt.Encode();
        var b = new byte[1 + 1 + 8 + 16 + 32 + 1 + msg.Length + doubt.Length];
        b[0] = (byte)Status;
        b[1] = (byte)((HasStore ? StoreFlag : 0) | (IndexFollows ? IndexFlag : 0));
        BinaryPrimitives.WriteUInt64BigEndian(b.AsSpan(2), Generation);
        Digest.AsSpan(0, 16).CopyTo(b.AsSpan(10));
        Nonce.AsSpan(0, 32).CopyTo(b.AsSpan(26));
        b[58] = (byte)msg.Length;
        msg.CopyTo(b.AsSpan(59));
        doubt.CopyTo(b.AsSpan(59 + msg.Length));
        return b;
    }

    public static (HelloReply Reply, int UnsignedLength, byte[] Proof) Decode(ReadOnlySpan<byte> p)
    {
        if (p.Length < 65) throw new PeerProtocolException($"hello reply of {p.Length} bytes is shorter than 65");
        if (p[0] > (byte)HelloStatus.Refused) throw new PeerProtocolException($"hello reply status {p[0]} unknown");
        if ((p[1] & ~(StoreFlag | IndexFlag)) != 0) throw new PeerProtocolException($"hello reply has unknown flags 0x{p[1]:x2}");
        if ((p[1] & IndexFlag) != 0 && (p[0] != (byte)HelloStatus.Mismatch || (p[1] & StoreFlag) == 0))
            throw new PeerProtocolException("hello reply offers a page index without a store it is out of step with");
        int msgLen = p[58];
        if (p.Length < 59 + msgLen) throw new PeerProtocolException("hello reply truncated in its message");
        var doubt = MemoryDoubt.Decode(p[(59 + msgLen)..]) ?? throw new PeerProtocolException("hello reply's pages in doubt are malformed or truncated");
        int unsigned = 59 + msgLen + doubt.Length;
        if (p.Length < unsigned + 1) throw new PeerProtocolException("hello reply truncated before its proof");
        int proofLen = p[unsigned];
        if (p.Length != unsigned + 1 + proofLen) throw new PeerProtocolException($"hello reply of {p.Length} bytes, expected {unsigned + 1 + proofLen}");
        var reply = new HelloReply((HelloStatus)p[0], (p[1] & 1) != 0, BinaryPrimitives.ReadUInt64BigEndian(p[2..]), p.Slice(10, 16).ToArray(),
            p.Slice(26, 32).ToArray(), Encoding.UTF8.GetString(p.Slice(59, msgLen))) { Doubt = doubt.Doubt, IndexFollows = (p[1] & IndexFlag) != 0 };
        return (reply, unsigned, p.Slice(unsigned + 1, proofLen).ToArray());
    }
}

/// <summary>
/// End of a memory stream (frame <see cref="FrameType.End"/>, sender to receiver):
/// <c>be64 new generation, 16 XXH3-128 of the stream the sender's QEMU wrote up to here, u8 flags (1 = snapshot complete), be16 multifd channels coded through the sender's store</c>.
/// The receiver passes the rest of the stream (the device state) to its QEMU only if the stream it
/// rebuilt hashes the same; once the trip's multifd channels have ended it commits its store and
/// answers <see cref="EndAck"/> with its store's digest, which the sender compares with its own.
/// </summary>
public sealed record EndMessage(ulong Generation, byte[] Digest, bool SnapshotComplete, ushort Channels = 0)
{
    public byte[] Encode()
    {
        var b = new byte[27];
        BinaryPrimitives.WriteUInt64BigEndian(b, Generation);
        Digest.AsSpan(0, 16).CopyTo(b.AsSpan(8));
        b[24] = SnapshotComplete ? (byte)1 : (byte)0;
        BinaryPrimitives.WriteUInt16BigEndian(b.AsSpan(25), Channels);
        return b;
    }

    public static EndMessage Decode(ReadOnlySpan<byte> p)
    {
        if (p.Length != 27) throw new PeerProtocolException($"end frame of {p.Length} bytes, expected 27");
        if ((p[24] & ~1) != 0) throw new PeerProtocolException($"end frame has unknown flags 0x{p[24]:x2}");
        ushort channels = BinaryPrimitives.ReadUInt16BigEndian(p[25..]);
        if (channels > Memory.ChannelCodecService.MaxChannels) throw new PeerProtocolException($"end frame names {channels} multifd channels (at most {Memory.ChannelCodecService.MaxChannels})");
        return new EndMessage(BinaryPrimitives.ReadUInt64BigEndian(p), p.Slice(8, 16).ToArray(), p[24] == 1, channels);
    }
}

/// <summary>Receiver's answer to <see cref="EndMessage"/>: <c>u8 committed (1) or not (0), 16 receiver digest</c>.</summary>
public sealed record EndAck(bool Committed, byte[] Digest)
{
    public byte[] Encode()
    {
        var b = new byte[17];
        b[0] = Committed ? (byte)1 : (byte)0;
        Digest.AsSpan(0, 16).CopyTo(b.AsSpan(1));
        return b;
    }

    public static EndAck Decode(ReadOnlySpan<byte> p)
    {
        if (p.Length != 17 || p[0] > 1) throw new PeerProtocolException($"end ack of {p.Length} bytes (first 0x{(p.Length > 0 ? p[0] : 0):x2}) is malformed");
        return new EndAck(p[0] == 1, p.Slice(1, 16).ToArray());
    }
}

/// <summary>
/// Receiver's progress in a paced memory stream (frame <see cref="FrameType.Progress"/>):
/// <c>be64 load its QEMU has taken so far</c>. Never decreases. Load is what the sender paces by
/// (<see cref="StreamPacer"/>): in the main stream, stream bytes plus a page for each zero page
/// among them (<see cref="Load"/>); in a coded multifd channel, stream bytes.
/// </summary>
public readonly record struct ProgressMessage(long Delivered)
{
    public const int Length = 8;

    /// <summary>
    /// The load of a main stream's first <paramref name="streamBytes"/> bytes, which hold
    /// <paramref name="zeroPages"/> zero pages: a zero page is about 9 bytes of the stream, but
    /// QEMU reads or clears a whole page of guest memory for it, in new memory with a page fault.
    /// </summary>
    public static long Load(long streamBytes, long zeroPages) => streamBytes + (zeroPages << QemuFormat.PageShift);

    public void Encode(Span<byte> destination) => BinaryPrimitives.WriteInt64BigEndian(destination, Delivered);

    public static ProgressMessage Decode(ReadOnlySpan<byte> p)
    {
        if (p.Length != Length) throw new PeerProtocolException($"progress frame of {p.Length} bytes, expected {Length}");
        long n = BinaryPrimitives.ReadInt64BigEndian(p);
        if (n < 0) throw new PeerProtocolException($"progress frame claims {n} bytes delivered");
        return new ProgressMessage(n);
    }
}
