using System.Buffers.Binary;
using System.Net;
using System.Net.Sockets;
using BFMig.Native.Compression;
using BFMig.Transfer.Wire;

namespace BFMig.Transfer.Tests;

public class WireTests
{
    [Fact]
    public void Frame_header_literal_bytes()
    {
        var h = new byte[8];
        FrameCodec.WriteHeader(h, FrameType.MigData, FrameCodecKind.Zstd, 0x1234);
        Assert.Equal(new byte[] { 0x10, 0x01, 0, 0, 0, 0, 0x12, 0x34 }, h);
        Assert.Equal(new FrameHeader(FrameType.MigData, FrameCodecKind.Zstd, 0x1234), FrameCodec.ParseHeader(h, 0));
    }

    [Theory]
    [InlineData(new byte[] { 0x99, 0, 0, 0, 0, 0, 0, 0 }, "unknown frame type 0x99 at byte 40")]
    [InlineData(new byte[] { 0x10, 7, 0, 0, 0, 0, 0, 0 }, "unknown codec 7 in MigData frame at byte 40")]
    [InlineData(new byte[] { 0x10, 0, 0, 1, 0, 0, 0, 0 }, "reserved field 0x0001 set")]
    [InlineData(new byte[] { 0x11, 0, 0, 0, 0x7f, 0xff, 0xff, 0xff }, "Tunnel frame of 2147483647 bytes at byte 40 exceeds")]
    [InlineData(new byte[] { 0x11, 1, 0, 0, 0, 0, 0, 2 }, "has no length prefix")]
    public void Bad_headers_are_rejected_with_what_and_where(byte[] header, string message)
    {
        var e = Assert.Throws<PeerProtocolException>(() => FrameCodec.ParseHeader(header, 40));
        Assert.Contains(message, e.Message);
    }

    [Theory]
    [InlineData(1)]
    [InlineData(FrameCodec.ProtocolVersion)]
    [InlineData(ushort.MaxValue)]
    public void A_version_probe_says_any_version_in_the_same_fourteen_bytes(int version)
    {
        var frame = VersionProbe.Encode((ushort)version);
        Assert.Equal(new byte[] { 0x05, 0, 0, 0, 0, 0, 0, 6, (byte)'B', (byte)'F', (byte)'M', (byte)'P', (byte)(version >> 8), (byte)version }, frame);
        Assert.Equal(version, VersionProbe.Decode(frame));
    }

    [Fact]
    public void A_wrong_probe_is_refused_with_what_is_wrong()
    {
        var frame = VersionProbe.Encode(FrameCodec.ProtocolVersion);
        Assert.Contains("probe of 13 bytes is shorter than 14", Assert.Throws<PeerProtocolException>(() => VersionProbe.Decode(frame.AsSpan(0, 13))).Message);
        var route = (byte[])frame.Clone();
        route[0] = (byte)FrameType.Route;
        Assert.Contains("a Route frame (None), not a probe", Assert.Throws<PeerProtocolException>(() => VersionProbe.Decode(route)).Message);
        byte[] trailing = [.. frame, 0];
        Assert.Contains("probe payload of 6 bytes in a frame of 15", Assert.Throws<PeerProtocolException>(() => VersionProbe.Decode(trailing)).Message);
        var longer = (byte[])trailing.Clone();
        longer[7] = 7;
        Assert.Equal(FrameCodec.ProtocolVersion, VersionProbe.Decode(longer));
        var magic = (byte[])frame.Clone();
        magic[11] = (byte)'R';
        Assert.Contains("probe magic 42464D52 is not BFMP", Assert.Throws<PeerProtocolException>(() => VersionProbe.Decode(magic)).Message);
    }

    [Fact]
    public void TryReadFrame_consumes_nothing_until_the_frame_is_complete()
    {
        var frame = new byte[8 + 5];
        FrameCodec.WriteHeader(frame, FrameType.Tunnel, FrameCodecKind.None, 5);
        "hello"u8.CopyTo(frame.AsSpan(8));
        for (int n = 0; n < frame.Length; n++)
        {
            Assert.False(FrameCodec.TryReadFrame(frame.AsSpan(0, n), 0, out _, out _, out int consumed));
            Assert.Equal(0, consumed);
        }
        Assert.True(FrameCodec.TryReadFrame(frame, 0, out var h, out var payload, out int c));
        Assert.Equal(FrameType.Tunnel, h.Type);
        Assert.Equal("hello"u8.ToArray(), payload.ToArray());
        Assert.Equal(13, c);
    }

    [Theory]
    [InlineData(CompressionMode.None)]
    [InlineData(CompressionMode.Zstd)]
    [InlineData(CompressionMode.Lz4)]
    [InlineData(CompressionMode.Auto)]
    public async Task Frames_round_trip_through_every_codec(CompressionMode mode)
    {
        var ms = new MemoryStream();
        using var w = new FrameWriter(ms, mode);
        var payloads = new List<byte[]> { new byte[100_000], new byte[10], System.Text.Encoding.ASCII.GetBytes(string.Concat(Enumerable.Repeat("abcdef", 5000))), Array.Empty<byte>() };
        var rnd = new byte[300_000];
        new Random(1).NextBytes(rnd);
        payloads.Add(rnd);
        foreach (var p in payloads) await w.WriteAsync(FrameType.Tunnel, p, compress: true, default);
        if (mode is CompressionMode.Zstd or CompressionMode.Lz4) Assert.True(w.BytesWritten < 400_000, $"{w.BytesWritten} bytes");
        ms.Position = 0;
        using var r = new FrameReader(ms, TimeSpan.FromSeconds(5));
        foreach (var p in payloads)
        {
            var f = await r.ReadAsync(default);
            Assert.Equal(FrameType.Tunnel, f!.Value.Type);
            Assert.Equal(p, f.Value.Payload.ToArray());
        }
        Assert.Null(await r.ReadAsync(default));
    }

    [Fact]
    public async Task Corrupt_compressed_frames_and_lying_lengths_are_protocol_errors()
    {
        var bad = new byte[8 + 4 + 20];
        FrameCodec.WriteHeader(bad, FrameType.MigData, FrameCodecKind.Zstd, 24);
        BinaryPrimitives.WriteUInt32BigEndian(bad.AsSpan(8), 1000);
        var e = await Assert.ThrowsAsync<PeerProtocolException>(async () => await new FrameReader(new MemoryStream(bad), TimeSpan.FromSeconds(5)).ReadAsync(default));
        Assert.Contains("MigData frame at byte 0", e.Message);

        BinaryPrimitives.WriteUInt32BigEndian(bad.AsSpan(8), 50_000_000);
        e = await Assert.ThrowsAsync<PeerProtocolException>(async () => await new FrameReader(new MemoryStream(bad), TimeSpan.FromSeconds(5)).ReadAsync(default));
        Assert.Contains("claims 50000000 uncompressed bytes", e.Message);

        e = await Assert.ThrowsAsync<PeerProtocolException>(async () => await new FrameReader(new MemoryStream(bad[..20]), TimeSpan.FromSeconds(5)).ReadAsync(default));
        Assert.Contains("ended inside a MigData frame", e.Message);
    }

    [Fact]
    public async Task A_silent_peer_times_out()
    {
        var (a, b) = await Pair();
        using var _ = a;
        using var __ = b;
        using var r = new FrameReader(new NetworkStream(a), TimeSpan.FromMilliseconds(300));
        await Assert.ThrowsAsync<TimeoutException>(async () => await r.ReadAsync(default));
    }

    /// <summary>
    /// A rolling upgrade from 8 or 9: their sources' helpers' frames mean what they meant, so
    /// their hello and route are read here; a version outside 8-10 is refused naming both.
    /// </summary>
    [Theory]
    [InlineData(FrameCodec.OldestPeerVersion, true)]
    [InlineData(9, true)]
    [InlineData(FrameCodec.ProtocolVersion, true)]
    [InlineData(FrameCodec.OldestPeerVersion - 1, false)]
    [InlineData(FrameCodec.ProtocolVersion + 1, false)]
    [InlineData(0, false)]
    public void Hello_and_route_of_the_versions_this_side_reads_are_taken_others_refused_by_name(int version, bool read)
    {
        var guest = Guid.NewGuid();
        var hello = new Hello(StreamKind.Mig, true, guest, 7, new byte[16], 1, new byte[32], "hostA").Encode();
        var route = new RouteRequest(StreamKind.Nbd, guest, "hostA") { TargetPort = 49152 }.Encode();
        hello[4] = route[4] = (byte)(version >> 8);
        hello[5] = route[5] = (byte)version;
        if (read)
        {
            var h = Hello.Decode(hello);
            var r = RouteRequest.Decode(route);
            Assert.Equal((guest, 49152), (h.Guest, (int)r.TargetPort));
            // The decoded version is kept: an older peer's hello encodes to its own bytes (the
            // fuzz target's round trip) and says which version the peer spoke.
            Assert.Equal((version, version), (h.Version, r.Version));
            Assert.Equal(hello, h.Encode());
            Assert.Equal(route, r.Encode());
            return;
        }
        var expected = $"peer speaks protocol version {version}, this helper {FrameCodec.ProtocolVersion} (reads {FrameCodec.OldestPeerVersion} to {FrameCodec.ProtocolVersion})";
        Assert.Equal(expected, Assert.Throws<PeerProtocolException>(() => Hello.Decode(hello)).Message);
        Assert.Equal(expected, Assert.Throws<PeerProtocolException>(() => RouteRequest.Decode(route)).Message);
    }

    [Fact]
    public void Hello_round_trips_and_rejects_malformed_bytes()
    {
        var h = new Hello(StreamKind.Mig, true, Guid.NewGuid(), 42, Enumerable.Range(0, 16).Select(i => (byte)i).ToArray(), 0x1122334455667788, new byte[32], "hostA");
        var bytes = h.Encode();
        Assert.Equal("BFMG"u8.ToArray(), bytes[..4]);
        var d = Hello.Decode(bytes);
        Assert.Equal(h.Guest, d.Guest);
        Assert.Equal(42UL, d.Generation);
        Assert.Equal(h.Digest, d.Digest);
        Assert.Equal("hostA", d.SenderName);
        Assert.Contains("shorter", Assert.Throws<PeerProtocolException>(() => Hello.Decode(bytes[..50])).Message);
        var v = (byte[])bytes.Clone(); v[5] = (byte)(FrameCodec.ProtocolVersion + 1);
        Assert.Contains($"protocol version {FrameCodec.ProtocolVersion + 1}", Assert.Throws<PeerProtocolException>(() => Hello.Decode(v)).Message);
        var k = (byte[])bytes.Clone(); k[6] = 7;
        Assert.Contains("unknown stream kind 7", Assert.Throws<PeerProtocolException>(() => Hello.Decode(k)).Message);
        var f = (byte[])bytes.Clone(); f[7] = 0x80;
        Assert.Contains("unknown flags", Assert.Throws<PeerProtocolException>(() => Hello.Decode(f)).Message);
        var m = (byte[])bytes.Clone(); m[0] = (byte)'X';
        Assert.Contains("magic", Assert.Throws<PeerProtocolException>(() => Hello.Decode(m)).Message);
    }

    internal static async Task<(Socket, Socket)> Pair()
    {
        string path = Path.Combine(Path.GetTempPath(), $"bfmig-pair-{Guid.NewGuid():N}.sock");
        using var l = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        l.Bind(new UnixDomainSocketEndPoint(path));
        l.Listen(1);
        var c = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        var accept = l.AcceptAsync();
        await c.ConnectAsync(new UnixDomainSocketEndPoint(path));
        var s = await accept;
        File.Delete(path);
        return (c, s);
    }

    /// <summary>A connected TCP pair over loopback (client, accepted); the listener is gone.</summary>
    internal static async Task<(Socket, Socket)> TcpPair()
    {
        using var l = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        l.Bind(new IPEndPoint(IPAddress.Loopback, 0));
        l.Listen(1);
        var c = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        var accept = l.AcceptAsync();
        await c.ConnectAsync(l.LocalEndPoint!);
        return (c, await accept);
    }

    private static async Task<(HelloReply?, Exception?, Exception?)> Handshake2(IPeerAuthenticator senderAuth, IPeerAuthenticator receiverAuth)
    {
        var (a, b) = await Pair();
        using var sa = new NetworkStream(a, true);
        using var sb = new NetworkStream(b, true);
        using var ra = new FrameReader(sa, TimeSpan.FromSeconds(5));
        using var wa = new FrameWriter(sa);
        using var rb = new FrameReader(sb, TimeSpan.FromSeconds(5));
        using var wb = new FrameWriter(sb);
        var hello = new Hello(StreamKind.Mig, true, Guid.NewGuid(), 1, new byte[16], 7, new byte[32], "a");
        var server = Task.Run(() => Handshake.ServerAsync(rb, wb, receiverAuth, _ => new HelloDecision(HelloStatus.Match, true, 1, new byte[16], ""), default));
        HelloReply? reply = null;
        Exception? ce = null, se = null;
        try { reply = await Handshake.ClientAsync(ra, wa, senderAuth, hello, default); } catch (Exception e) { ce = e; a.Dispose(); }
        try { await server; } catch (Exception e) { se = e; }
        return (reply, ce, se);
    }

    [Fact]
    public async Task Psk_handshake_succeeds_with_the_same_key()
    {
        var key = "d6717ea04526c3497f3fbe83910bbaf698ae24ff467b74ed125a968c8ce0d749"u8.ToArray();
        var (reply, ce, se) = await Handshake2(new PskPeerAuthenticator(key), new PskPeerAuthenticator(key));
        Assert.Null(ce);
        Assert.Null(se);
        Assert.Equal(HelloStatus.Match, reply!.Status);
    }

    [Fact]
    public async Task Psk_handshake_fails_on_both_sides_with_a_wrong_key()
    {
        var (_, ce, se) = await Handshake2(new PskPeerAuthenticator("d6717ea04526c3497f3fbe83910bbaf698ae24ff467b74ed125a968c8ce0d749"u8), new PskPeerAuthenticator("20a43ef89350399ef31a5369ba8698647934d9744a4db3c82485dfe2446811df"u8));
        Assert.IsType<PeerAuthenticationException>(ce);
        Assert.Contains("receiver failed authentication", ce!.Message);
        Assert.NotNull(se);
    }

    [Fact]
    public async Task Psk_against_no_authentication_is_refused()
    {
        var (_, ce, _) = await Handshake2(new PskPeerAuthenticator("d6717ea04526c3497f3fbe83910bbaf698ae24ff467b74ed125a968c8ce0d749"u8), NoPeerAuthenticator.Instance);
        Assert.IsType<PeerAuthenticationException>(ce);
    }

    [Fact]
    public void Compression_policy_skips_compression_on_a_fast_link_and_uses_it_on_a_slow_one()
    {
        var fast = new CompressionPolicy(CompressionMode.Auto);
        for (int i = 0; i < 20; i++) fast.RecordSend(1 << 20, TimeSpan.FromMicroseconds(100)); // ~10 GB/s
        Assert.Equal(FrameCodecKind.None, fast.Choose());
        var slow = new CompressionPolicy(CompressionMode.Auto);
        for (int i = 0; i < 20; i++) slow.RecordSend(1 << 20, TimeSpan.FromMilliseconds(80)); // ~100 Mbit/s
        Assert.Equal(FrameCodecKind.Zstd, slow.Choose());
        var mid = new CompressionPolicy(CompressionMode.Auto);
        for (int i = 0; i < 20; i++) mid.RecordSend(1 << 20, TimeSpan.FromMilliseconds(1.2)); // ~7 Gbit/s: zstd too slow, lz4 pays
        Assert.Equal(FrameCodecKind.Lz4, mid.Choose());
    }

    [Fact]
    public void Incompressible_frames_are_sent_plain_and_compressible_ones_compressed_right_after()
    {
        var p = new CompressionPolicy(CompressionMode.Zstd);
        var random = new byte[256 << 10];
        new Random(2).NextBytes(random);
        Assert.Equal(FrameCodecKind.None, p.Choose(random));
        Assert.Equal(FrameCodecKind.Zstd, p.Choose(new byte[256 << 10]));
        Assert.Equal(FrameCodecKind.None, new CompressionPolicy(CompressionMode.None).Choose(new byte[256 << 10]));
    }

    [Fact]
    public void Zstd_and_lz4_round_trip_and_reject_corrupt_input()
    {
        var data = System.Text.Encoding.ASCII.GetBytes(string.Concat(Enumerable.Repeat("bfmig ", 2000)));
        using var z = new ZstdCodec();
        var c = new byte[ZstdCodec.CompressBound(data.Length)];
        int n = z.Compress(data, c);
        var back = new byte[data.Length];
        Assert.Equal(data.Length, z.Decompress(c.AsSpan(0, n), back));
        Assert.Equal(data, back);
        Assert.Contains("zstd decompress", Assert.Throws<CompressionException>(() => z.Decompress(new byte[] { 1, 2, 3, 4, 5, 6 }, back)).Message);
        var l = new byte[Lz4Codec.CompressBound(data.Length)];
        int m = Lz4Codec.Compress(data, l);
        Assert.Equal(data.Length, Lz4Codec.Decompress(l.AsSpan(0, m), back));
        Assert.Equal(data, back);
        Assert.Throws<CompressionException>(() => Lz4Codec.Decompress(new byte[] { 0xff, 0xff, 0xff }, back));
        Assert.Throws<CompressionException>(() => z.Compress(data, new byte[10]));
    }
}
