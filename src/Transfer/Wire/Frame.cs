using System.Buffers.Binary;
using BFMig.Transfer.Memory;

namespace BFMig.Transfer.Wire;

/// <summary>Frame types of the peer protocol (version <see cref="FrameCodec.ProtocolVersion"/>).</summary>
public enum FrameType : byte
{
    Hello = 0x01,
    HelloReply = 0x02,
    Auth = 0x03,
    /// <summary>In clear before TLS: which guest and stream a connection is for, so the receiving daemon can route it (<see cref="RouteRequest"/>).</summary>
    Route = 0x04,
    /// <summary>In clear, either direction, alone on its connection: a bfmigd asking a peer's bfmigd which protocol it speaks, and the answer (<see cref="VersionProbe"/>).</summary>
    Probe = 0x05,
    /// <summary>Memory stream: an op stream (<see cref="BFMig.Transfer.Memory.MigOps"/>).</summary>
    MigData = 0x10,
    /// <summary>S->R, first frame of a memory stream with a store: the sender's pages in doubt (<see cref="BFMig.Transfer.Memory.MemoryDoubt"/>).</summary>
    MigDoubt = 0x13,
    /// <summary>A multifd channel coded against the store: ops of <see cref="BFMig.Transfer.Memory.MultifdEncoder"/> (protocol 5).</summary>
    MultifdData = 0x14,
    /// <summary>R->S after a hello reply that offers it: the head of the receiver's page index (<see cref="BFMig.Transfer.Memory.PeerPageIndex"/>, protocol 6).</summary>
    PageIndexHead = 0x15,
    /// <summary>R->S: one run of the receiver's page index (<see cref="BFMig.Transfer.Memory.PeerPageIndex"/>).</summary>
    PageIndexPages = 0x16,
    /// <summary>Opaque bytes of a tunnelled stream (either direction).</summary>
    Tunnel = 0x11,
    /// <summary>The writer of a tunnel direction reached EOF.</summary>
    TunnelEof = 0x12,
    End = 0x20,
    EndAck = 0x21,
    /// <summary>R->S in a paced memory stream: how much of the rebuilt stream the receiving QEMU has taken (<see cref="ProgressMessage"/>).</summary>
    Progress = 0x22,
    Abort = 0x30,
}

/// <summary>How a frame's payload is compressed.</summary>
public enum FrameCodecKind : byte
{
    None = 0,
    Zstd = 1,
    Lz4 = 2,
}

/// <summary>A parsed frame header.</summary>
/// <param name="Type">Frame type.</param>
/// <param name="Codec">Payload compression; compressed payloads start with a be32 uncompressed length.</param>
/// <param name="WireLength">Payload bytes following the header on the wire.</param>
public readonly record struct FrameHeader(FrameType Type, FrameCodecKind Codec, int WireLength);

/// <summary>
/// Frame layout: <c>u8 type, u8 codec, u16 reserved (0), be32 wire length</c>, then the payload.
/// A compressed payload is <c>be32 uncompressed length</c> + compressed bytes. Every length is
/// checked against <see cref="MaxPayload"/> before anything is allocated.
/// </summary>
public static class FrameCodec
{
    /// <summary>
    /// 2: frames after a pre-shared-key handshake are sealed (<see cref="FrameSealer"/>), and the
    /// disk channel's export hello carries the block-identity key. 3: the export hello and reply
    /// carry each host's blocks in doubt after a failed trip (<c>DiskDoubt</c>), and the hello may
    /// mark a stream as a multifd channel. 4: a memory stream's End comes before every byte the
    /// sender's parser did not understand, and the receiver no longer holds back the stream's last
    /// byte until End (a 3 sender with a 4 receiver would let the device state reach QEMU before the
    /// digest check); the hello reply carries the receiver's memory pages in doubt and a memory
    /// stream with a store starts with the sender's (<see cref="FrameType.MigDoubt"/>).
    /// 5: multifd channels are coded against the store (<see cref="FrameType.MultifdData"/>, the
    /// hello's coded-channel flag); the main stream's ops carry its sync rounds, and its End carries
    /// a hash of the rebuilt stream instead of the store's digest, which the channels' writes
    /// would make depend on timing (the digest is compared in the end acknowledgement instead).
    /// 6: a receiver not in step with the sender but holding a snapshot of the guest from an
    /// earlier trip offers its page index (keyed MACs, <see cref="FrameType.PageIndexHead"/>), so
    /// an arrival from a host it never exchanged the guest with is cheap too.
    /// 7: a paced main stream's progress counts each zero page as a whole page (<see cref="ProgressMessage.Load"/>).
    /// 8: the main stream's ops say when the source QEMU paused the guest (<c>PAUSED</c>, <see cref="BFMig.Transfer.Memory.MigOps"/>):
    /// from there the sender no longer paces and the receiver no longer gates its QEMU.
    /// 9: bfmigd answers a peer's version probe (<see cref="FrameType.Probe"/>, <see cref="VersionProbe"/>),
    /// so that transparent mode carries a stream at stock cost to a peer of another version instead
    /// of handing it to a helper the peer would refuse; the helpers' frames are those of 8.
    /// 10: the hello's quiet-channel flag (<see cref="Hello.QuietChannel"/>, QEMU 10's post-copy
    /// preempt channel). A 9 receiver would refuse such a hello only at the switch to post-copy,
    /// with the guest already split between the hosts; it refuses a 10 sender's first stream
    /// instead, while the guest still runs on the source.
    /// A peer's hello or route of a version this side does not read (<see cref="RequirePeerVersion"/>)
    /// is refused by name rather than misread.
    /// </summary>
    public const ushort ProtocolVersion = 10;

    /// <summary>
    /// The oldest version whose hello and route this side reads. 9 changed no helper frame (it
    /// added bfmigd's answer to the probe), and 10 only added a hello flag an older sender never
    /// sets, so a source of 8 or 9 is taken at full saving while hosts are upgraded one by one; a
    /// source of this version probes an older peer first and carries its streams at stock cost.
    /// A version that changes what an older sender's frames mean raises this to itself.
    /// </summary>
    public const ushort OldestPeerVersion = 8;

    /// <summary>Refuses, naming both, a hello or route of a version this side does not read.</summary>
    public static void RequirePeerVersion(ushort version)
    {
        if (version is < OldestPeerVersion or > ProtocolVersion)
            throw new PeerProtocolException($"peer speaks protocol version {version}, this helper {ProtocolVersion} (reads {OldestPeerVersion} to {ProtocolVersion})");
    }

    public const int HeaderLength = 8;
    /// <summary>Largest uncompressed payload.</summary>
    public const int MaxPayload = 1 << 20;
    /// <summary>Largest payload on the wire (room for incompressible data plus codec overhead).</summary>
    public const int MaxWireLength = MaxPayload + (64 << 10);

    /// <summary>Parses and validates a header; throws <see cref="PeerProtocolException"/> naming the bad field.</summary>
    public static FrameHeader ParseHeader(ReadOnlySpan<byte> header, long streamOffset)
    {
        byte type = header[0];
        byte codec = header[1];
        ushort reserved = BinaryPrimitives.ReadUInt16BigEndian(header[2..]);
        uint length = BinaryPrimitives.ReadUInt32BigEndian(header[4..]);
        if (!Enum.IsDefined((FrameType)type))
            throw new PeerProtocolException($"unknown frame type 0x{type:x2} at byte {streamOffset}");
        if (codec > (byte)FrameCodecKind.Lz4)
            throw new PeerProtocolException($"unknown codec {codec} in {(FrameType)type} frame at byte {streamOffset}");
        if (reserved != 0)
            throw new PeerProtocolException($"reserved field 0x{reserved:x4} set in {(FrameType)type} frame at byte {streamOffset}");
        if (length > MaxWireLength)
            throw new PeerProtocolException($"{(FrameType)type} frame of {length} bytes at byte {streamOffset} exceeds {MaxWireLength}");
        if (codec != 0 && length < 4)
            throw new PeerProtocolException($"compressed {(FrameType)type} frame of {length} bytes at byte {streamOffset} has no length prefix");
        return new FrameHeader((FrameType)type, (FrameCodecKind)codec, (int)length);
    }

    /// <summary>Writes a header.</summary>
    public static void WriteHeader(Span<byte> destination, FrameType type, FrameCodecKind codec, int wireLength)
    {
        destination[0] = (byte)type;
        destination[1] = (byte)codec;
        destination[2] = 0;
        destination[3] = 0;
        BinaryPrimitives.WriteUInt32BigEndian(destination[4..], (uint)wireLength);
    }

    /// <summary>
    /// Finds one complete frame at the start of <paramref name="input"/>. Returns false (consuming
    /// nothing) when more input is needed; throws <see cref="PeerProtocolException"/> on a bad header.
    /// </summary>
    public static bool TryReadFrame(ReadOnlySpan<byte> input, long streamOffset, out FrameHeader header, out ReadOnlySpan<byte> payload, out int consumed)
    {
        header = default;
        payload = default;
        consumed = 0;
        if (input.Length < HeaderLength) return false;
        var h = ParseHeader(input, streamOffset);
        if (input.Length < HeaderLength + h.WireLength) return false;
        header = h;
        payload = input.Slice(HeaderLength, h.WireLength);
        consumed = HeaderLength + h.WireLength;
        return true;
    }

    /// <summary>Reads the uncompressed length prefix of a compressed payload and checks it.</summary>
    public static int UncompressedLength(ReadOnlySpan<byte> payload, FrameHeader header, long streamOffset)
    {
        uint n = BinaryPrimitives.ReadUInt32BigEndian(payload);
        if (n > MaxPayload)
            throw new PeerProtocolException($"{header.Type} frame at byte {streamOffset} claims {n} uncompressed bytes (max {MaxPayload})");
        return (int)n;
    }
}
