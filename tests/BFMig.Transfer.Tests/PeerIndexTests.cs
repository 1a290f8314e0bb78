using System.Buffers.Binary;
using System.Text;
using BFMig.Transfer.Disk;
using BFMig.Transfer.Memory;
using BFMig.Transfer.Wire;

namespace BFMig.Transfer.Tests;

/// <summary>
/// The receiver's page index (<see cref="PeerPageIndex"/>, issue 15) as a sender reads it: what a
/// store offers round-trips exactly, and a hostile or broken receiver's index is refused by name,
/// before anything is allocated for what it claims.
/// </summary>
public class PeerIndexTests
{
    private static readonly DiskHashKey Key = new(Enumerable.Range(1, 32).Select(i => (byte)i).ToArray());

    private static byte[] Head(params (string Name, ulong Bytes)[] blocks)
    {
        var b = new List<byte>(Key.Bytes.ToArray());
        var u64 = new byte[8];
        BinaryPrimitives.WriteUInt64BigEndian(u64, 0x1234);
        b.AddRange(u64);
        BinaryPrimitives.WriteUInt64BigEndian(u64, 7);
        b.AddRange(u64);
        b.Add((byte)blocks.Length);
        foreach (var (name, bytes) in blocks)
        {
            var n = Encoding.UTF8.GetBytes(name);
            b.Add((byte)n.Length);
            b.AddRange(n);
            BinaryPrimitives.WriteUInt64BigEndian(u64, bytes);
            b.AddRange(u64);
        }
        return [.. b];
    }

    private static byte[] Pages(uint block, ulong first, params UInt128[] macs)
    {
        var b = new byte[12 + macs.Length * 16];
        BinaryPrimitives.WriteUInt32BigEndian(b, block);
        BinaryPrimitives.WriteUInt64BigEndian(b.AsSpan(4), first);
        for (int i = 0; i < macs.Length; i++) BinaryPrimitives.WriteUInt128LittleEndian(b.AsSpan(12 + i * 16), macs[i]);
        return b;
    }

    private static async Task<PeerPageIndex> Read(long maxRam, params (FrameType Type, byte[] Payload)[] frames)
    {
        var ms = new MemoryStream();
        using (var w = new FrameWriter(ms, CompressionMode.Zstd))
            foreach (var (type, payload) in frames) await w.WriteAsync(type, payload, compress: true, default);
        ms.Position = 0;
        using var r = new FrameReader(ms, TimeSpan.FromSeconds(5));
        return await PeerPageIndex.ReadAsync(r, maxRam, default);
    }

    [Fact]
    public async Task A_well_formed_index_reads_back_by_block_name_and_length()
    {
        var index = await Read(1 << 30,
            (FrameType.PageIndexHead, Head(("pc.ram", 3 * 4096), ("vga.vram", 4096))),
            (FrameType.PageIndexPages, Pages(0, 0, 11, 0)),
            (FrameType.PageIndexPages, Pages(0, 2, 13)),
            (FrameType.PageIndexPages, Pages(1, 0, 21)));
        Assert.Equal(0x1234UL, index.Seed);
        Assert.Equal(3, index.KnownPages);
        var layout = index.ForLayout([new RamBlockInfo("vga.vram", 4096), new RamBlockInfo("pc.ram", 3 * 4096), new RamBlockInfo("pc.ram", 4096), new RamBlockInfo("other", 4096)]);
        Assert.Equal([(UInt128)21], layout[0]!);
        Assert.Equal([(UInt128)11, 0, 13], layout[1]!);
        Assert.Null(layout[2]); // same name, another length: not the receiver's block
        Assert.Null(layout[3]);
        Assert.Equal(DiskBlockHash.Compute(new byte[4096], Key), index.Mac(new byte[4096]));
    }

    public static TheoryData<string, (FrameType, byte[])[]> Hostile => new()
    {
        { "more than the 1048576 bytes of RAM", [(FrameType.PageIndexHead, Head(("pc.ram", 1UL << 62)))] },
        { "more than the 1048576 bytes of RAM", [(FrameType.PageIndexHead, Head(("a", 1 << 19), ("b", 1 << 19), ("c", 4096)))] },
        { "is not whole pages", [(FrameType.PageIndexHead, Head(("pc.ram", 4095)))] },
        { "names block 'pc.ram' twice", [(FrameType.PageIndexHead, Head(("pc.ram", 4096), ("pc.ram", 4096)))] },
        { "bytes after its last block", [(FrameType.PageIndexHead, [.. Head(("pc.ram", 4096)), 0])] },
        { "truncated", [(FrameType.PageIndexHead, Head(("pc.ram", 4096))[..^3])] },
        { "expected the index head, got a MigData frame", [(FrameType.MigData, Head(("pc.ram", 4096)))] },
        { "expected block 0 page 1", [(FrameType.PageIndexHead, Head(("pc.ram", 2 * 4096))), (FrameType.PageIndexPages, Pages(0, 0, 1)), (FrameType.PageIndexPages, Pages(0, 0, 1))] },
        { "expected block 0 page 0", [(FrameType.PageIndexHead, Head(("pc.ram", 4096))), (FrameType.PageIndexPages, Pages(1, 0, 1))] },
        { "overruns block 0", [(FrameType.PageIndexHead, Head(("pc.ram", 4096))), (FrameType.PageIndexPages, Pages(0, 0, 1, 2))] },
        { "whole 16-byte entries", [(FrameType.PageIndexHead, Head(("pc.ram", 4096))), (FrameType.PageIndexPages, Pages(0, 0, 1)[..^1])] },
        { "closed the connection before the index of block 0 from page 1", [(FrameType.PageIndexHead, Head(("pc.ram", 2 * 4096))), (FrameType.PageIndexPages, Pages(0, 0, 1))] },
        { "aborted before the index head: no thanks", [(FrameType.Abort, Handshake.EncodeAbort("no thanks"))] },
    };

    [Theory]
    [MemberData(nameof(Hostile))]
    public async Task A_malformed_or_oversized_index_is_refused_by_name(string expected, (FrameType, byte[])[] frames)
    {
        var e = await Assert.ThrowsAsync<PeerProtocolException>(() => Read(1 << 20, frames));
        Assert.Contains(expected, e.Message);
    }

    [Fact]
    public void A_hello_reply_carries_the_index_offer_only_on_a_mismatch_with_a_store()
    {
        var digest = new byte[16];
        var nonce = new byte[32];
        var offer = new HelloReply(HelloStatus.Mismatch, true, 4, digest, nonce, "generation 4 here, 9 on the sender") { IndexFollows = true };
        var (decoded, _, _) = HelloReply.Decode([.. offer.EncodeUnsigned(), 0]);
        Assert.True(decoded.IndexFollows);
        foreach (var bad in new[]
                 {
                     new HelloReply(HelloStatus.Match, true, 4, digest, nonce, "") { IndexFollows = true },
                     new HelloReply(HelloStatus.Mismatch, false, 0, digest, nonce, "") { IndexFollows = true },
                 })
        {
            var e = Assert.Throws<PeerProtocolException>(() => HelloReply.Decode([.. bad.EncodeUnsigned(), 0]));
            Assert.Contains("offers a page index without a store it is out of step with", e.Message);
        }
    }
}
