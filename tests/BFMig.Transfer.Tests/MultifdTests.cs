using System.Buffers.Binary;
using System.Net;
using System.Net.Sockets;
using BFMig.Transfer;
using BFMig.Transfer.Memory;
using BFMig.Transfer.Wire;

namespace BFMig.Transfer.Tests;

/// <summary>
/// The multifd channel format of QEMU 7.2 (Debian 12: 32 reserved bytes where 9.0 put
/// zero_pages, zero pages travel on the main channel) and 10.0 (backports: zero pages listed
/// after the normal ones, no content), built byte by byte from the layout, and the gate that
/// keeps a channel's connection behind the main one.
/// </summary>
public class MultifdTests
{
    private static readonly Guid SourceUuid = Guid.Parse("0f3c1d2e-4b5a-6978-8a9b-acbdcedf0102");

    // A packet as QEMU 7.2 writes it: the layout by hand, not through EncodeHeader.
    private static byte[] Qemu72Packet(uint flags, ulong number, string block, ulong[] offsets, byte fill)
    {
        var header = new byte[64 + 256 + 8 * 128];
        BinaryPrimitives.WriteUInt32BigEndian(header, 0x11223344);
        BinaryPrimitives.WriteUInt32BigEndian(header.AsSpan(4), 1);
        BinaryPrimitives.WriteUInt32BigEndian(header.AsSpan(8), flags);
        BinaryPrimitives.WriteUInt32BigEndian(header.AsSpan(12), 128);
        BinaryPrimitives.WriteUInt32BigEndian(header.AsSpan(16), (uint)offsets.Length);
        BinaryPrimitives.WriteUInt32BigEndian(header.AsSpan(20), (uint)offsets.Length * 4096);
        BinaryPrimitives.WriteUInt64BigEndian(header.AsSpan(24), number);
        System.Text.Encoding.ASCII.GetBytes(block).CopyTo(header, 64);
        for (int i = 0; i < offsets.Length; i++)
            BinaryPrimitives.WriteUInt64BigEndian(header.AsSpan(320 + 8 * i), offsets[i]);
        // QEMU reuses its packet buffer: slots past the used ones keep stale offsets.
        BinaryPrimitives.WriteUInt64BigEndian(header.AsSpan(320 + 8 * 127), 0xdead_b000);
        return [.. header, .. Enumerable.Repeat(fill, offsets.Length * 4096)];
    }

    private static byte[] Qemu72Init(byte id)
    {
        var b = new byte[64];
        BinaryPrimitives.WriteUInt32BigEndian(b, 0x11223344);
        BinaryPrimitives.WriteUInt32BigEndian(b.AsSpan(4), 1);
        SourceUuid.TryWriteBytes(b.AsSpan(8), bigEndian: true, out _);
        b[24] = id;
        return b;
    }

    private static List<MultifdSegment> ParseAll(MultifdChannelParser parser, byte[] channel, int chunk)
    {
        var segments = new List<MultifdSegment>();
        var pending = new List<byte>();
        for (int at = 0; at < channel.Length; at += chunk)
        {
            pending.AddRange(channel.AsSpan(at, Math.Min(chunk, channel.Length - at)).ToArray());
            bool final = at + chunk >= channel.Length;
            while (parser.TryRead(pending.ToArray(), final, out var s))
            {
                Assert.True(s.Length > 0);
                segments.Add(s);
                pending.RemoveRange(0, s.Length);
            }
        }
        Assert.Empty(pending);
        Assert.Equal(channel.Length, segments.Sum(s => (long)s.Length));
        return segments;
    }

    [Theory]
    [InlineData(1)]
    [InlineData(777)]
    [InlineData(1 << 20)]
    public void Qemu72Channel_IsCutIntoInitHeadersAndPages_WhateverTheChunks(int chunk)
    {
        byte[] channel = [.. Qemu72Init(1),
            .. Qemu72Packet(0, 7, "pc.ram", [0x1000, 0x5000, 0x3f000], 0xab),
            .. Qemu72Packet(MultifdFormat.FlagSync, 8, "pc.ram", [], 0),
            .. Qemu72Packet(0, 9, "pc.bios", [0], 0xcd)];
        var parser = new MultifdChannelParser();
        var segments = ParseAll(parser, channel, chunk);

        Assert.False(parser.IsOpaque, parser.OpaqueReason);
        Assert.Equal(new MultifdInit(1, SourceUuid), parser.Init);
        Assert.Equal([MultifdSegmentKind.Init, MultifdSegmentKind.PacketHeader, MultifdSegmentKind.Page, MultifdSegmentKind.Page, MultifdSegmentKind.Page,
            MultifdSegmentKind.PacketHeader, MultifdSegmentKind.PacketHeader, MultifdSegmentKind.Page], segments.Select(s => s.Kind));
        var pages = segments.Where(s => s.Kind == MultifdSegmentKind.Page).ToList();
        Assert.Equal([0x1000UL, 0x5000, 0x3f000, 0], pages.Select(p => p.Offset));
        Assert.Equal(["pc.ram", "pc.ram", "pc.ram", "pc.bios"], pages.Select(p => p.Packet!.RamBlock));
        Assert.True(segments[5].Packet!.IsSync);
        Assert.Equal(8UL, segments[5].Packet!.PacketNumber);
        Assert.Equal((3, 4L, 0L), ((int)parser.Packets, parser.Pages, parser.ZeroPages));
    }

    /// <summary>
    /// QEMU 7.2 prepares content (and sets next_packet_size) only for a packet with pages: a sync
    /// packet without pages carries the previous packet's size, and no content follows (seen in
    /// the lab: 524288 and 57344 left in sync packets of a real channel).
    /// </summary>
    [Fact]
    public void Qemu72SyncPacketWithoutPages_KeepsAStaleContentSize_AndHasNoContent()
    {
        var sync = Qemu72Packet(MultifdFormat.FlagSync, 5, "pc.ram", [], 0);
        BinaryPrimitives.WriteUInt32BigEndian(sync.AsSpan(20), 524288);
        byte[] channel = [.. Qemu72Init(0), .. Qemu72Packet(0, 4, "pc.ram", [0x1000], 0x44), .. sync, .. Qemu72Packet(0, 6, "pc.ram", [0x2000], 0x55)];
        var parser = new MultifdChannelParser();
        var segments = ParseAll(parser, channel, 3000);
        Assert.False(parser.IsOpaque, parser.OpaqueReason);
        Assert.Equal((3L, 2L), (parser.Packets, parser.Pages));
        Assert.Equal([0x1000UL, 0x2000], segments.Where(s => s.Kind == MultifdSegmentKind.Page).Select(s => s.Offset));
    }

    [Fact]
    public void Qemu10Packet_ListsZeroPagesAfterTheNormalOnes_WithoutContent()
    {
        var packet = new MultifdPacket(0, 41, "pc.ram", [0x2000], [0x0, 0x7000]);
        var header = packet.EncodeHeader();
        // The 10.0 layout: zero_pages right after packet_num, offsets normal first.
        Assert.Equal(2u, BinaryPrimitives.ReadUInt32BigEndian(header.AsSpan(32)));
        Assert.Equal(0x7000UL, BinaryPrimitives.ReadUInt64BigEndian(header.AsSpan(320 + 16)));
        byte[] channel = [.. Qemu72Init(0), .. header, .. new byte[4096]];

        var parser = new MultifdChannelParser();
        var segments = ParseAll(parser, channel, 1000);

        Assert.False(parser.IsOpaque, parser.OpaqueReason);
        var read = segments[1].Packet!;
        Assert.Equal([0x2000UL], read.NormalOffsets);
        Assert.Equal([0x0UL, 0x7000], read.ZeroOffsets);
        Assert.Equal(MultifdSegmentKind.Page, segments[2].Kind);
        Assert.Equal(3, segments.Count);
        Assert.Equal(2, parser.ZeroPages);
        Assert.Equal(header, MultifdPacket.TryParse(header, out _)!.EncodeHeader());
    }

    public static TheoryData<string, Action<byte[]>, string> NotUnderstood => new()
    {
        { "zstd", h => BinaryPrimitives.WriteUInt32BigEndian(h.AsSpan(8), 2 << 1), "compression" },
        { "zlib", h => BinaryPrimitives.WriteUInt32BigEndian(h.AsSpan(8), 1 << 1 | 1), "compression" },
        { "device state (10.0)", h => BinaryPrimitives.WriteUInt32BigEndian(h.AsSpan(8), 1 << 6), "device state" },
        { "version 2", h => BinaryPrimitives.WriteUInt32BigEndian(h.AsSpan(4), 2), "version 2" },
        { "bad magic", h => BinaryPrimitives.WriteUInt32BigEndian(h.AsSpan(0), 0x5145564d), "magic 0x5145564d" },
        { "other page size", h => BinaryPrimitives.WriteUInt32BigEndian(h.AsSpan(12), 32), "32 page slots" },
        { "too many pages", h => BinaryPrimitives.WriteUInt32BigEndian(h.AsSpan(16), 129), "129 normal" },
        { "normal + zero > slots", h => BinaryPrimitives.WriteUInt32BigEndian(h.AsSpan(32), 127), "127 zero" },
        { "content size", h => BinaryPrimitives.WriteUInt32BigEndian(h.AsSpan(20), 4095), "4095 content bytes" },
        { "content size of a page more", h => BinaryPrimitives.WriteUInt32BigEndian(h.AsSpan(20), 3 * 4096), "12288 content bytes" },
        { "reserved bytes", h => h[50] = 1, "reserved" },
        { "unaligned offset", h => BinaryPrimitives.WriteUInt64BigEndian(h.AsSpan(320), 0x1001), "not page-aligned" },
        { "unterminated name", h => h.AsSpan(64, 256).Fill((byte)'a'), "NUL-terminated" },
        { "binary name", h => h[66] = 0xff, "printable" },
        { "no name", h => h.AsSpan(64, 256).Clear(), "no ramblock" },
    };

    [Theory]
    [MemberData(nameof(NotUnderstood))]
    public void PacketNotUnderstoodInFull_MakesTheRestOpaque_AndSaysWhy(string what, Action<byte[]> damage, string reason)
    {
        var good = Qemu72Packet(0, 1, "pc.ram", [0x1000, 0x2000], 0x11);
        var bad = Qemu72Packet(0, 2, "pc.ram", [0x3000, 0x4000], 0x22);
        damage(bad);
        byte[] channel = [.. Qemu72Init(0), .. good, .. bad, .. good];
        var parser = new MultifdChannelParser();
        var segments = ParseAll(parser, channel, 4096);

        Assert.True(parser.IsOpaque, what);
        Assert.Contains(reason, parser.OpaqueReason);
        Assert.StartsWith("packet 1:", parser.OpaqueReason);
        // Before the damaged packet everything was understood; from it on nothing is.
        Assert.Equal(2, segments.Count(s => s.Kind == MultifdSegmentKind.Page));
        Assert.All(segments.SkipWhile(s => s.Kind != MultifdSegmentKind.Raw), s => Assert.Equal(MultifdSegmentKind.Raw, s.Kind));
    }

    [Fact]
    public void Qemu10SyncPacket_WithNoPageSlots_IsASyncPacket_NotAReasonToStopFollowing()
    {
        // QEMU 10.0 zeroes a SYNC packet and fills only magic, version, flags and number (pages_alloc 0).
        var sync = new byte[MultifdFormat.PacketHeaderLength];
        System.Buffers.Binary.BinaryPrimitives.WriteUInt32BigEndian(sync, MultifdFormat.Magic);
        System.Buffers.Binary.BinaryPrimitives.WriteUInt32BigEndian(sync.AsSpan(4), MultifdFormat.Version);
        System.Buffers.Binary.BinaryPrimitives.WriteUInt32BigEndian(sync.AsSpan(8), MultifdFormat.FlagSync);
        System.Buffers.Binary.BinaryPrimitives.WriteUInt64BigEndian(sync.AsSpan(24), 7);
        var packet = MultifdPacket.TryParse(sync, out var why);
        Assert.True(packet is not null, why);
        Assert.True(packet!.IsSync);
        Assert.Empty(packet.NormalOffsets);
        // Slots 0 with a page listed is still refused.
        System.Buffers.Binary.BinaryPrimitives.WriteUInt32BigEndian(sync.AsSpan(16), 1);
        Assert.Null(MultifdPacket.TryParse(sync, out why));
        Assert.Contains("0 page slots", why);
    }

    [Fact]
    public void MainStreamOnAChannel_AndATruncatedChannel_GoOpaque()
    {
        var main = new MultifdChannelParser();
        byte[] qevm = [0x51, 0x45, 0x56, 0x4d, 0, 0, 0, 3, .. new byte[100]];
        ParseAll(main, qevm, 64);
        Assert.Contains("magic 0x5145564d", main.OpaqueReason);

        var cut = new MultifdChannelParser();
        byte[] channel = [.. Qemu72Init(0), .. Qemu72Packet(0, 1, "pc.ram", [0x1000], 0x33)];
        var segments = ParseAll(cut, channel[..^100], 1 << 20);
        Assert.Contains("ended inside a packet", cut.OpaqueReason);
        Assert.Equal(MultifdSegmentKind.Raw, segments[^1].Kind);
    }

    [Fact]
    public void IncompleteInput_ConsumesNothing()
    {
        var parser = new MultifdChannelParser();
        Assert.False(parser.TryRead(Qemu72Init(0)[..63], isFinal: false, out _));
        Assert.Equal(0, parser.Position);
        Assert.True(parser.TryRead(Qemu72Init(0), isFinal: false, out var init));
        Assert.Equal(MultifdSegmentKind.Init, init.Kind);
        Assert.False(parser.TryRead(new byte[MultifdFormat.PacketHeaderLength - 1], isFinal: false, out _));
        Assert.Equal(64, parser.Position);
        Assert.False(parser.IsOpaque);
    }

    [Fact]
    public void Hello_SaysWhetherTheStreamIsAMultifdChannel()
    {
        var hello = new Hello(StreamKind.Mig, false, Guid.NewGuid(), 0, new byte[16], 0, new byte[32], "hostA") { MultifdChannel = true };
        var bytes = hello.Encode();
        Assert.Equal(4, bytes[7]);
        Assert.True(Hello.Decode(bytes).MultifdChannel);
        Assert.False(Hello.Decode((hello with { MultifdChannel = false }).Encode()).MultifdChannel);
    }

    [Fact]
    public void ProcNetLines_CountTheListenersConnections_NotTheListenerOrOtherPaths()
    {
        string[] unix =
        [
            "0000000000000000: 00000002 00000000 00010000 0001 01 41 /run/bfmig/b/g.mig",
            "0000000000000000: 00000003 00000000 00000000 0001 03 42 /run/bfmig/b/g.mig",
            "0000000000000000: 00000002 00000000 00000000 0001 02 43 /run/bfmig/b/g.mig",
            "0000000000000000: 00000003 00000000 00000000 0001 03 44 /run/bfmig/b/g.nbd",
            "0000000000000000: 00000003 00000000 00000000 0001 03 45",
        ];
        Assert.Equal(2, MainChannelGate.UnixConnections(unix, "/run/bfmig/b/g.mig"));
        Assert.Equal(0, MainChannelGate.UnixConnections(unix[..1], "/run/bfmig/b/g.mig"));
        string[] tcp =
        [
            "   0: 00000000:C000 00000000:0000 0A 00000000:00000000 00:00000000 00000000   64        0 51 1",
            "   1: 0100007F:C000 0100007F:D431 01 00000000:00000000 00:00000000 00000000   64        0 52 1",
            "   2: 0100007F:D431 0100007F:C000 01 00000000:00000000 00:00000000 00000000    0        0 53 1",
        ];
        Assert.Equal(1, MainChannelGate.TcpConnections(tcp, 0xC000));
        Assert.Equal(0, MainChannelGate.TcpConnections(tcp[..1], 0xC000));
    }

    [Fact]
    public async Task Gate_OpensOnceTheListenerHoldsAConnection_AndTimesOutOtherwise()
    {
        var path = Path.Combine(Path.GetTempPath(), $"bfmig-gate-{Guid.NewGuid():N}.sock");
        using var listener = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        listener.Bind(new UnixDomainSocketEndPoint(path));
        listener.Listen(4);
        try
        {
            var local = Endpoint.Parse("unix:" + path);
            await Assert.ThrowsAsync<TimeoutException>(() => MainChannelGate.WaitAsync(local, TimeSpan.FromMilliseconds(200), CancellationToken.None));
            var gate = MainChannelGate.WaitAsync(local, TimeSpan.FromSeconds(10), CancellationToken.None);
            await Task.Delay(100);
            Assert.False(gate.IsCompleted);
            // Queued, not yet accepted: the main channel is ahead in the listener's queue already.
            using var main = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
            await main.ConnectAsync(new UnixDomainSocketEndPoint(path));
            await gate.WaitAsync(TimeSpan.FromSeconds(5));

            using var tcp = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
            tcp.Bind(new IPEndPoint(IPAddress.Loopback, 0));
            tcp.Listen(4);
            var port = ((IPEndPoint)tcp.LocalEndPoint!).Port;
            var tcpLocal = Endpoint.Parse($"tcp:127.0.0.1:{port}");
            Assert.Equal(0, MainChannelGate.Connections(tcpLocal.Address));
            using var client = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
            await client.ConnectAsync(new IPEndPoint(IPAddress.Loopback, port));
            await MainChannelGate.WaitAsync(tcpLocal, TimeSpan.FromSeconds(5), CancellationToken.None);
        }
        finally
        {
            File.Delete(path);
        }
    }
}
