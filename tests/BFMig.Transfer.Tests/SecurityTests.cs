using System.Buffers.Binary;
using System.Net.Sockets;
using System.Security.Cryptography;
using BFMig.Transfer.Disk;
using BFMig.Transfer.Memory;
using BFMig.Transfer.Tests.Nbd;
using BFMig.Transfer.Wire;

namespace BFMig.Transfer.Tests;

/// <summary>
/// Issue 12, findings 3 (page and block identity a guest can forge) and 5 (PSK mode carried
/// guest memory and disk in clear).
/// </summary>
public class SecurityTests
{
    // ---- Finding 3: memory pages ----

    /// <summary>
    /// A page that collides with <paramref name="page"/> under XXH3-128 with <paramref name="seed"/>,
    /// made as a guest that knows the seed could (it crossed in clear in PSK hellos). XXH3's long
    /// loop adds each 8-byte lane as is to the neighbour accumulator and the 32x32 product of the
    /// lane XOR secret to its own; with the low half of (lane XOR secret) zero the product is zero
    /// whatever the high half, so +2^32 in lane 0 of stripe 0 and -2^32 in lane 0 of stripe 1
    /// leave every accumulator unchanged. <paramref name="page"/> is adjusted so that this holds.
    /// </summary>
    internal static byte[] Xxh3Collision(byte[] page, ulong seed)
    {
        // XXH3's default secret (first 16 bytes); a seed adds to even words and subtracts from odd ones.
        ulong s0 = 0xbe4ba423396cfeb8UL + seed;
        ulong s1 = 0x1cad21f72c81017cUL - seed;
        void SetLow(byte[] p, int at, ulong secret) =>
            BinaryPrimitives.WriteUInt32LittleEndian(p.AsSpan(at), (uint)secret);
        SetLow(page, 0, s0);
        SetLow(page, 64, s1);
        var twin = (byte[])page.Clone();
        BinaryPrimitives.WriteUInt64LittleEndian(twin, BinaryPrimitives.ReadUInt64LittleEndian(twin) + (1UL << 32));
        BinaryPrimitives.WriteUInt64LittleEndian(twin.AsSpan(64), BinaryPrimitives.ReadUInt64LittleEndian(twin.AsSpan(64)) - (1UL << 32));
        return twin;
    }

    private static byte[] Random4K(int seed)
    {
        var p = new byte[4096];
        new Random(seed).NextBytes(p);
        return p;
    }

    [Fact]
    public void A_page_crafted_to_collide_with_the_retained_one_is_carried_not_elided()
    {
        var pages = Enumerable.Range(0, 8).Select(Random4K).ToArray();
        var blocks = new List<(string, byte[][])> { ("pc.ram", pages) };
        using var dirA = new TempDir();
        using var dirB = new TempDir();
        var guest = Guid.NewGuid();
        using var a = MemoryStore.Open(dirA.Path, guest);
        using var b = MemoryStore.Open(dirB.Path, guest);
        ulong seed = a.State.Seed;
        var twin = Xxh3Collision(pages[2], seed);
        CoreTrip.Run(StreamBuilder.FullStream(blocks), a, b);

        // The guest, now on B, rewrites page 2 with its twin: same page hash, different bytes.
        Assert.Equal(seed, b.State.Seed);
        Assert.Equal(MemoryStore.HashPage(pages[2], seed), MemoryStore.HashPage(twin, seed));
        Assert.NotEqual(pages[2], twin);
        pages[2] = twin;
        var s = StreamBuilder.FullStream(blocks);
        var (o, st, _) = CoreTrip.Run(s, b, a);

        Assert.Equal(s, o);
        Assert.Equal(7, st.PagesElided);
        // And the stores hold the twin now: the trip back carries nothing.
        var (back, st2, _) = CoreTrip.Run(s, a, b);
        Assert.Equal(s, back);
        Assert.Equal(8, st2.PagesElided);
    }

    [Fact]
    public void A_page_crafted_to_collide_with_another_retained_page_is_not_referenced()
    {
        var pages = Enumerable.Range(100, 8).Select(Random4K).ToArray();
        var blocks = new List<(string, byte[][])> { ("pc.ram", pages) };
        using var dirA = new TempDir();
        using var dirB = new TempDir();
        var guest = Guid.NewGuid();
        using var a = MemoryStore.Open(dirA.Path, guest);
        using var b = MemoryStore.Open(dirB.Path, guest);
        // Page 1 has predictable content (think of a setuid binary's page in the page cache).
        var twin = Xxh3Collision(pages[1], a.State.Seed);
        CoreTrip.Run(StreamBuilder.FullStream(blocks), a, b);

        // A process in the guest writes the twin to page 5: it must not turn into page 1's bytes.
        pages[5] = twin;
        var s = StreamBuilder.FullStream(blocks);
        var (o, st, _) = CoreTrip.Run(s, b, a);

        Assert.Equal(s, o);
        Assert.Equal(0, st.PagesReferenced);
        Assert.Equal(7, st.PagesElided);
    }

    // ---- Finding 3: disk blocks ----

    [Fact]
    public void Disk_block_hash_is_hmac_sha256_under_the_key_truncated_to_128_bits()
    {
        var key = new DiskHashKey(Enumerable.Range(0, 32).Select(i => (byte)i).ToArray());
        var block = Random4K(9);
        var expected = BinaryPrimitives.ReadUInt128LittleEndian(HMACSHA256.HashData(Enumerable.Range(0, 32).Select(i => (byte)i).ToArray(), block));
        Assert.Equal(expected, DiskBlockHash.Compute(block, key));
        // Another key, another identity: nothing about a block's hash follows from its content alone.
        Assert.NotEqual(DiskBlockHash.Compute(block, key), DiskBlockHash.Compute(block, DiskHashKey.NewRandom()));
        Assert.NotEqual(DiskHashKey.NewRandom(), DiskHashKey.NewRandom());
    }

    [Fact]
    public void A_version_1_disk_map_hashed_under_the_guest_derived_seed_is_not_trusted()
    {
        using var dir = TestEnv.CreateTempDir();
        string path = dir.File("disk.map");
        File.WriteAllBytes(path, VersionOneMap(imageSize: 1 << 20, blockSize: 65536));
        var e = Assert.Throws<DiskMapException>(() => DiskBlockMap.Load(path));
        Assert.Contains("bad version 1", e.Message, StringComparison.Ordinal);
        Assert.Null(DiskMapStore.LoadTrusted(path));
    }

    [Fact]
    public void A_map_without_a_key_is_not_trusted_and_a_keyed_one_keeps_its_key()
    {
        using var dir = TestEnv.CreateTempDir();
        string unkeyed = dir.File("unkeyed.map");
        new DiskBlockMap(1 << 20).Save(unkeyed);
        Assert.Null(DiskMapStore.LoadTrusted(unkeyed));
        string keyed = dir.File("keyed.map");
        var key = DiskHashKey.NewRandom();
        new DiskBlockMap(1 << 20, DiskMapStore.BlockSize, key).Save(keyed);
        Assert.Equal(key, DiskMapStore.LoadTrusted(keyed)!.HashKey);
    }

    // A map as the previous helper wrote it: version 1, seed at 24, 76-byte header, no key.
    private static byte[] VersionOneMap(ulong imageSize, int blockSize)
    {
        long blocks = DiskBlockHash.CountBlocks(imageSize, blockSize);
        var b = new byte[76 + ((blocks + 63) / 64 * 8) + (blocks * 16) + 16];
        "BFMDMAP\0"u8.CopyTo(b);
        BinaryPrimitives.WriteInt32LittleEndian(b.AsSpan(8), 1);
        BinaryPrimitives.WriteInt32LittleEndian(b.AsSpan(16), blockSize);
        BinaryPrimitives.WriteInt64LittleEndian(b.AsSpan(24), 12345);
        BinaryPrimitives.WriteUInt64LittleEndian(b.AsSpan(32), imageSize);
        BinaryPrimitives.WriteInt64LittleEndian(b.AsSpan(40), blocks);
        System.IO.Hashing.XxHash128.Hash(b.AsSpan(0, b.Length - 16), b.AsSpan(b.Length - 16));
        return b;
    }

    // ---- Finding 5: PSK frames sealed ----

    private static readonly byte[] Psk = "d6717ea04526c3497f3fbe83910bbaf698ae24ff467b74ed125a968c8ce0d749"u8.ToArray();

    [Fact]
    public async Task After_a_psk_handshake_guest_bytes_cross_encrypted_both_ways()
    {
        var (a, b) = await WireTests.Pair();
        var tapA = new TapStream(new NetworkStream(a, true));
        var tapB = new TapStream(new NetworkStream(b, true));
        using var ra = new FrameReader(tapA, TimeSpan.FromSeconds(5));
        using var wa = new FrameWriter(tapA, CompressionMode.None);
        using var rb = new FrameReader(tapB, TimeSpan.FromSeconds(5));
        using var wb = new FrameWriter(tapB, CompressionMode.None);
        var hello = new Hello(StreamKind.Mig, true, Guid.NewGuid(), 1, new byte[16], 7, new byte[32], "a");
        var server = Task.Run(() => Handshake.ServerAsync(rb, wb, new PskPeerAuthenticator(Psk), _ => new HelloDecision(HelloStatus.Match, true, 1, new byte[16], ""), default));
        await Handshake.ClientAsync(ra, wa, new PskPeerAuthenticator(Psk), hello, default);
        await server;

        var guestPage = "SECRET GUEST PAGE "u8.ToArray();
        var payload = Enumerable.Repeat(guestPage, 200).SelectMany(x => x).ToArray();
        await wa.WriteAsync(FrameType.Tunnel, payload, compress: false, default);
        await wa.FlushAsync(default);
        var got = await rb.ReadAsync(default);
        Assert.Equal(FrameType.Tunnel, got!.Value.Type);
        Assert.Equal(payload, got.Value.Payload.ToArray());
        await wb.WriteAsync(FrameType.Tunnel, payload, compress: false, default);
        await wb.FlushAsync(default);
        Assert.Equal(payload, (await ra.ReadAsync(default))!.Value.Payload.ToArray());

        Assert.True(tapA.Written.Length > payload.Length && tapB.Written.Length > payload.Length);
        Assert.Equal(-1, tapA.Written.AsSpan().IndexOf(guestPage));
        Assert.Equal(-1, tapB.Written.AsSpan().IndexOf(guestPage));
        await tapA.DisposeAsync();
        await tapB.DisposeAsync();
    }

    /// <summary>Before the peer proved anything no decompressor runs on its bytes: a compressed handshake frame is refused as such.</summary>
    [Fact]
    public async Task A_compressed_hello_is_refused_before_any_decompression()
    {
        var (a, b) = await WireTests.Pair();
        using var sender = a;
        using var rb = new FrameReader(new NetworkStream(b, true), TimeSpan.FromSeconds(5));
        using var wb = new FrameWriter(new NetworkStream(b, false), CompressionMode.None);
        var server = Task.Run(() => Handshake.ServerAsync(rb, wb, new PskPeerAuthenticator(Psk), _ => throw new InvalidOperationException("no hello may be decoded"), default));
        // A well-formed zstd frame of 3000 zero bytes, as a peer would build it by hand.
        var frame = new byte[FrameCodec.HeaderLength + 4 + 256];
        using var zstd = new BFMig.Native.Compression.ZstdCodec();
        int n = zstd.Compress(new byte[3000], frame.AsSpan(FrameCodec.HeaderLength + 4));
        System.Buffers.Binary.BinaryPrimitives.WriteUInt32BigEndian(frame.AsSpan(FrameCodec.HeaderLength), 3000);
        FrameCodec.WriteHeader(frame, FrameType.Hello, FrameCodecKind.Zstd, n + 4);
        await sender.SendAsync(frame.AsMemory(0, FrameCodec.HeaderLength + 4 + n));
        var e = await Assert.ThrowsAsync<PeerProtocolException>(() => server);
        Assert.Equal("Hello frame at byte 0 is compressed (Zstd) during the handshake", e.Message);
    }

    private static List<byte[]> SealedFrames(byte[] key, int count, bool compress = false)
    {
        var ms = new MemoryStream();
        using (var w = new FrameWriter(ms, compress ? CompressionMode.Zstd : CompressionMode.None))
        {
            w.Protect(new FrameSealer(key));
            for (int i = 0; i < count; i++)
                w.WriteAsync(FrameType.Tunnel, Enumerable.Repeat((byte)('a' + i), 3000).ToArray(), compress, default).AsTask().GetAwaiter().GetResult();
        }
        var frames = new List<byte[]>();
        var all = ms.ToArray();
        for (int at = 0; at < all.Length;)
        {
            int len = FrameCodec.HeaderLength + FrameCodec.ParseHeader(all.AsSpan(at), at).WireLength;
            frames.Add(all[at..(at + len)]);
            at += len;
        }
        return frames;
    }

    private static async Task<List<byte[]>> ReadSealed(byte[] key, IEnumerable<byte[]> frames)
    {
        using var r = new FrameReader(new MemoryStream(frames.SelectMany(f => f).ToArray()), TimeSpan.FromSeconds(5));
        r.Protect(new FrameSealer(key));
        var got = new List<byte[]>();
        while (await r.ReadAsync(default) is { } f) got.Add(f.Payload.ToArray());
        return got;
    }

    [Fact]
    public async Task Sealed_frames_round_trip_compressed_or_not()
    {
        var keys = FrameKeys.Derive(Psk, "transcript"u8);
        foreach (bool compress in new[] { false, true })
        {
            var frames = SealedFrames(keys.SenderToReceiver, 3, compress);
            if (!compress) Assert.Equal(FrameCodec.HeaderLength + 3000 + FrameSealer.TagLength, frames[0].Length);
            var got = await ReadSealed(keys.SenderToReceiver, frames);
            Assert.Equal(3, got.Count);
            Assert.All(got.Select((g, i) => (g, i)), x => Assert.Equal(Enumerable.Repeat((byte)('a' + x.i), 3000), x.g));
        }
    }

    public static TheoryData<string> Tampering() => new() { "flip", "replay", "reorder", "drop", "header", "direction" };

    [Theory]
    [MemberData(nameof(Tampering))]
    public async Task A_tampered_replayed_reordered_or_dropped_frame_aborts_the_stream(string how)
    {
        var keys = FrameKeys.Derive(Psk, "transcript"u8);
        var f = SealedFrames(keys.SenderToReceiver, 3);
        byte[] readKey = keys.SenderToReceiver;
        List<byte[]> wire;
        switch (how)
        {
            case "flip":
                f[1][FrameCodec.HeaderLength + 100] ^= 0x01;
                wire = f;
                break;
            case "replay":
                wire = [f[0], f[0], f[1]];
                break;
            case "reorder":
                wire = [f[1], f[0], f[2]];
                break;
            case "drop":
                wire = [f[0], f[2]];
                break;
            case "header":
                f[0][0] = (byte)FrameType.MigData;
                wire = f;
                break;
            default:
                // A frame of one direction reflected into the other.
                readKey = keys.ReceiverToSender;
                wire = f;
                break;
        }
        var e = await Assert.ThrowsAsync<PeerAuthenticationException>(() => ReadSealed(readKey, wire));
        Assert.Contains("failed authentication", e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public async Task Sealed_frames_from_the_pipeline_keep_their_order_and_open()
    {
        var key = FrameKeys.Derive(Psk, "pipeline"u8).SenderToReceiver;
        var ms = new MemoryStream();
        var big = new byte[FrameCodec.MaxPayload];
        new Random(3).NextBytes(big);
        using (var w = new FrameWriter(ms, CompressionMode.Zstd))
        {
            w.Protect(new FrameSealer(key));
            await using var p = new FramePipeline(w);
            for (int i = 0; i < 6; i++)
            {
                var slot = await p.RentAsync(default);
                // Incompressible (sent detached from its own buffer) and compressible frames in turn.
                if (i % 2 == 0) big.CopyTo(slot.Payload, 0);
                else Array.Fill(slot.Payload, (byte)i, 0, 200_000);
                slot.Payload[0] = (byte)i;
                p.Post(slot, FrameType.MigData, i % 2 == 0 ? big.Length : 200_000, compress: true);
            }
            await p.FlushAsync(default);
        }
        using var r = new FrameReader(new MemoryStream(ms.ToArray()), TimeSpan.FromSeconds(5));
        r.Protect(new FrameSealer(key));
        for (int i = 0; i < 6; i++)
        {
            var frame = (await r.ReadAsync(default))!.Value;
            Assert.Equal(i % 2 == 0 ? big.Length : 200_000, frame.Payload.Length);
            Assert.Equal((byte)i, frame.Payload.Span[0]);
            if (i % 2 == 0) Assert.True(frame.Payload.Span[1..].SequenceEqual(big.AsSpan(1)));
        }
        Assert.Null(await r.ReadAsync(default));
    }

    [Fact]
    public void Frame_keys_differ_per_direction_and_per_transcript()
    {
        var k1 = FrameKeys.Derive(Psk, "hello one"u8);
        var k2 = FrameKeys.Derive(Psk, "hello two"u8);
        Assert.NotEqual(k1.SenderToReceiver, k1.ReceiverToSender);
        Assert.NotEqual(k1.SenderToReceiver, k2.SenderToReceiver);
        Assert.Equal(k1.SenderToReceiver, FrameKeys.Derive(Psk, "hello one"u8).SenderToReceiver);
    }

    /// <summary>Passes everything through and keeps a copy of what was written (what an on-path observer sees).</summary>
    private sealed class TapStream(Stream inner) : Stream
    {
        private readonly MemoryStream _written = new();
        public byte[] Written => _written.ToArray();
        public override bool CanRead => true;
        public override bool CanSeek => false;
        public override bool CanWrite => true;
        public override long Length => throw new NotSupportedException();
        public override long Position { get => throw new NotSupportedException(); set => throw new NotSupportedException(); }
        public override void Flush() => inner.Flush();
        public override Task FlushAsync(CancellationToken cancellationToken) => inner.FlushAsync(cancellationToken);
        public override int Read(byte[] buffer, int offset, int count) => inner.Read(buffer, offset, count);
        public override ValueTask<int> ReadAsync(Memory<byte> buffer, CancellationToken cancellationToken = default) => inner.ReadAsync(buffer, cancellationToken);
        public override void Write(byte[] buffer, int offset, int count)
        {
            lock (_written) _written.Write(buffer, offset, count);
            inner.Write(buffer, offset, count);
        }
        public override ValueTask WriteAsync(ReadOnlyMemory<byte> buffer, CancellationToken cancellationToken = default)
        {
            lock (_written) _written.Write(buffer.Span);
            return inner.WriteAsync(buffer, cancellationToken);
        }
        public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();
        public override void SetLength(long value) => throw new NotSupportedException();
        protected override void Dispose(bool disposing)
        {
            if (disposing) inner.Dispose();
            base.Dispose(disposing);
        }
    }
}
