using System.Net.Sockets;
using BFMig.Transfer.Memory;
using BFMig.Transfer.Wire;

namespace BFMig.Transfer.Tests;

/// <summary>A peer declares the RAM layout the receiver sizes its store by: it must stay within the incoming guest's memory.</summary>
public class HostileLayoutTests
{
    // BLOCKS op: 1 block, name "pc.ram", length as LEB128.
    private static byte[] BlockList(params byte[] length) =>
        [MigOps.Blocks, 1, 6, (byte)'p', (byte)'c', (byte)'.', (byte)'r', (byte)'a', (byte)'m', .. length];

    public static TheoryData<byte[], string> Oversized => new()
    {
        // 2^52 bytes: before the cap the store's page index (2^40 entries) ended the helper in an OverflowException.
        { BlockList(0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x08), "block 0 of 4503599627370496 bytes" },
        // 4 GiB for a 64 MiB guest: accepted before (a 4 GiB store file and a 16 MiB index).
        { BlockList(0x80, 0x80, 0x80, 0x80, 0x10), "block 0 of 4294967296 bytes" },
        // Two blocks that only together exceed the limit.
        { [MigOps.Blocks, 2, 1, (byte)'a', 0x80, 0x80, 0x80, 0x80, 0x04, 1, (byte)'b', 0x80, 0x80, 0x80, 0x80, 0x04], "block 1 of 1073741824 bytes takes the declared RAM to 2147483648 bytes" },
    };

    [Theory]
    [MemberData(nameof(Oversized))]
    public async Task A_layout_larger_than_the_guest_is_refused_with_a_reason(byte[] ops, string message)
    {
        var guest = Guid.NewGuid();
        using var d = new TempDir();
        var (senderPeer, receiverPeer) = await WireTests.Pair();
        var (receiverLocal, qemuDst) = await WireTests.Pair();
        using var __ = qemuDst;
        // A 64 MiB guest: with the device allowance, at most 1088 MiB may be declared.
        var o = new TransferOptions { StoreRoot = d.Path, Guest = guest, IdleTimeout = TimeSpan.FromSeconds(5), MaxRamBytes = RamLimit.ForGuest(64 << 20) };
        var recv = TransferRunner.ReceiveAsync(receiverPeer, _ => Task.FromResult(LocalConnection.FromSocket(receiverLocal)), o, default);
        using var ns = new NetworkStream(senderPeer, true);
        using var r = new FrameReader(ns, TimeSpan.FromSeconds(5));
        using var w = new FrameWriter(ns);
        await Handshake.ClientAsync(r, w, NoPeerAuthenticator.Instance, new Hello(StreamKind.Mig, true, guest, 0, new byte[16], 1, new byte[32], "x"), default);
        await w.WriteAsync(FrameType.MigDoubt, MemoryDoubt.None.Encode(), false, default);
        await w.WriteAsync(FrameType.MigData, ops, false, default);
        await w.FlushAsync(default);
        var e = await Assert.ThrowsAsync<PeerProtocolException>(() => recv.WaitAsync(TimeSpan.FromSeconds(20)));
        Assert.Contains(message, e.Message);
        Assert.Contains($"over this guest's limit of {(64L << 20) + RamLimit.DeviceAllowance}", e.Message);
        // Nothing was sized by the refused layout.
        Assert.Empty(Directory.EnumerateFiles(d.Path, "*.pages", SearchOption.AllDirectories));
    }

    /// <summary>Block names are the store's file names: a layout that repeats one is refused before the store is touched.</summary>
    [Fact]
    public void A_layout_that_repeats_a_block_name_is_refused()
    {
        using var d = new TempDir();
        using var store = BFMig.Transfer.Memory.MemoryStore.Open(d.Path, Guid.NewGuid());
        var decoder = new MigDecoder(store, keep: false, seed: 1, new TransferStats(), RamLimit.ForGuest(64 << 20));
        byte[] ops = [MigOps.Blocks, 2, 1, (byte)'a', 0x80, 0x20, 1, (byte)'a', 0x80, 0x20];
        var e = Assert.Throws<PeerProtocolException>(() => decoder.Process(ops, 0));
        Assert.Contains("block 1 repeats the name of an earlier block", e.Message);
        Assert.False(decoder.TripStarted);
        Assert.Empty(Directory.EnumerateFiles(d.Path, "*.pages", SearchOption.AllDirectories));
    }

    [Fact]
    public void A_layout_within_the_guest_is_accepted()
    {
        using var d = new TempDir();
        using var store = BFMig.Transfer.Memory.MemoryStore.Open(d.Path, Guid.NewGuid());
        var decoder = new MigDecoder(store, keep: false, seed: 1, new TransferStats(), RamLimit.ForGuest(64 << 20));
        byte[] ops = BlockList(0x80, 0x80, 0x80, 0x20); // 64 MiB
        Assert.Equal(ops.Length, decoder.Process(ops, 0));
        Assert.True(decoder.TripStarted);
        Assert.Equal(1, store.BlockCount);
    }

    [Fact]
    public void Without_the_guest_memory_the_host_memory_bounds_the_layout()
    {
        long limit = RamLimit.ForHost();
        Assert.InRange(limit, RamLimit.DeviceAllowance + (64L << 20), (1L << 40) + RamLimit.DeviceAllowance);
    }
}
