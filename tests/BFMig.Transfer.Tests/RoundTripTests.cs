using BFMig.Transfer.Memory;
using CsCheck;

namespace BFMig.Transfer.Tests;

public class RoundTripTests
{
    private enum Change { Same, Random, Moved, Rewrite, Zero, Small }

    private static byte[] RandomPage(Random r, int kind)
    {
        var p = new byte[4096];
        switch (kind % 4)
        {
            case 0: break;                                   // zero
            case 1: r.NextBytes(p); break;                   // incompressible
            case 2: for (int i = 0; i < p.Length; i++) p[i] = (byte)(i / 64 + kind); break; // compressible
            default: r.NextBytes(p.AsSpan(0, 256)); break;   // mostly zero
        }
        return p;
    }

    private static readonly Gen<(int Seed, int Pages0, int Pages1, Change[] Changes)> Scenario =
        Gen.Select(Gen.Int, Gen.Int[1, 48], Gen.Int[1, 8], Gen.Enum<Change>().Array[56]);

    [Fact]
    public void Random_memory_and_changes_round_trip_exactly_and_elide_what_is_retained()
    {
        Scenario.Sample(t =>
        {
            var (seed, n0, n1, changes) = t;
            var r = new Random(seed);
            var blocks = new List<(string, byte[][])>
            {
                ("pc.ram", Enumerable.Range(0, n0).Select(_ => RandomPage(r, r.Next(4))).ToArray()),
                ("pc.bios", Enumerable.Range(0, n1).Select(_ => RandomPage(r, r.Next(4))).ToArray()),
            };
            using var dirA = new TempDir();
            using var dirB = new TempDir();
            var guest = Guid.NewGuid();
            using var a = MemoryStore.Open(dirA.Path, guest);
            using var b = MemoryStore.Open(dirB.Path, guest);

            var s1 = StreamBuilder.FullStream(blocks, [(0, 0), (0, n0 - 1)]);
            var (o1, st1, _) = CoreTrip.Run(s1, a, b);
            Assert.Equal(s1, o1);
            Assert.Equal(0, st1.PagesElided);

            // The guest runs on B: pages change in every way a guest can change them.
            var pages = blocks[0].Item2;
            int expectSame = 0;
            for (int i = 0; i < pages.Length; i++)
            {
                switch (changes[i])
                {
                    case Change.Random: pages[i] = RandomPage(r, 1); break;
                    case Change.Moved: pages[i] = (byte[])pages[r.Next(pages.Length)].Clone(); break;
                    case Change.Zero: pages[i] = new byte[4096]; break;
                    case Change.Small: pages[i] = (byte[])pages[i].Clone(); pages[i][r.Next(4096)] ^= 0x5a; break;
                    default: if (pages[i].AsSpan().IndexOfAnyExcept((byte)0) >= 0) expectSame++; break;
                }
            }
            var s2 = StreamBuilder.FullStream(blocks, [(0, n0 / 2)]);
            var (o2, st2, rt2) = CoreTrip.Run(s2, b, a);
            Assert.Equal(s2, o2);
            Assert.True(st2.PagesElided >= expectSame, $"elided {st2.PagesElided}, expected at least {expectSame}");
            Assert.Equal(st2.PagesElided, rt2.PagesElided);
            Assert.Equal(st2.PagesReferenced, rt2.PagesReferenced);

            // And back again: the stores still agree.
            var s3 = StreamBuilder.FullStream(blocks);
            var (o3, st3, _) = CoreTrip.Run(s3, a, b, chunk: 1000);
            Assert.Equal(s3, o3);
            Assert.Equal(0, st3.PagesFull);
        }, iter: 60);
    }

    [Fact]
    public void Moved_and_slightly_changed_pages_use_references_and_deltas()
    {
        var r = new Random(5);
        var pages = Enumerable.Range(0, 16).Select(_ => RandomPage(r, 1)).ToArray();
        var blocks = new List<(string, byte[][])> { ("pc.ram", pages) };
        using var dirA = new TempDir();
        using var dirB = new TempDir();
        var guest = Guid.NewGuid();
        using var a = MemoryStore.Open(dirA.Path, guest);
        using var b = MemoryStore.Open(dirB.Path, guest);
        CoreTrip.Run(StreamBuilder.FullStream(blocks), a, b);
        pages[0] = (byte[])pages[3].Clone();
        pages[1] = (byte[])pages[4].Clone();
        pages[5] = (byte[])pages[5].Clone();
        pages[5][100] ^= 1;
        var s = StreamBuilder.FullStream(blocks);
        var (o, st, _) = CoreTrip.Run(s, b, a);
        Assert.Equal(s, o);
        Assert.Equal(2, st.PagesReferenced);
        Assert.Equal(1, st.PagesDelta);
        Assert.Equal(13, st.PagesElided);
        Assert.Equal(0, st.PagesFull);
    }

    public static TheoryData<string> FixtureNames() => new(Fixtures.Streams);

    [Theory]
    [MemberData(nameof(FixtureNames))]
    public void Real_streams_round_trip_twice_and_the_second_trip_elides(string name)
    {
        var s = Fixtures.Load(name);
        using var dirA = new TempDir();
        using var dirB = new TempDir();
        var guest = Guid.NewGuid();
        using var a = MemoryStore.Open(dirA.Path, guest);
        using var b = MemoryStore.Open(dirB.Path, guest);
        var (o1, st1, _) = CoreTrip.Run(s, a, b);
        Assert.Equal(s, o1);
        var (o2, st2, _) = CoreTrip.Run(s, b, a);
        Assert.Equal(s, o2);
        // A paused guest's pages are all retained. A running guest's stream sends some pages several times: the
        // early versions differ from the retained (final) one, and pseudo-random ones go in full again.
        if (name.Contains("paused", StringComparison.Ordinal)) Assert.Equal(0, st2.PagesFull);
        else Assert.True(st2.PagesFull <= st1.PagesFull / 4, $"{st2.PagesFull} full pages of {st1.PagesFull}");
        Assert.True(st2.PagesElided >= 40, $"{st2.PagesElided} elided");
        Assert.Equal(st1.PagesFull, st2.PagesElided + st2.PagesReferenced + st2.PagesDelta + st2.PagesFull);
    }
}

/// <summary>
/// The source QEMU pauses the guest before it writes the ram section's END: the sender says so
/// once (<see cref="MigOps.Paused"/>), right where END begins, so that neither side holds back what a
/// paused guest waits for (the sender's pacing, the receiver's load gate).
/// </summary>
public class SourcePausedTests
{
    private static byte[] Page(byte fill) => Enumerable.Repeat(fill, 4096).ToArray();

    [Fact]
    public void The_sender_says_once_that_the_source_paused_where_the_ram_sections_end_begins_and_the_receiver_hears_it()
    {
        var running = new StreamBuilder().Header().RamStart(("pc.ram", 4 * 4096)).Part().Page(0, 0, Page(1)).Page(0, 1, Page(2)).Eos().Footer();
        int endAt = running.ToArray().Length;
        var stream = running.End().Page(0, 2, Page(3)).Page(0, 1, Page(4)).Eos().Footer().DeviceStateAndEof().ToArray();
        using var dirA = new TempDir();
        using var dirB = new TempDir();
        var guest = Guid.NewGuid();
        using var a = MemoryStore.Open(dirA.Path, guest);
        using var b = MemoryStore.Open(dirB.Path, guest);
        var enc = new MigEncoder(a, synced: false, a.State.Seed, new TransferStats());
        var dec = new MigDecoder(b, keep: false, a.State.Seed, new TransferStats());
        using var output = new MemoryStream();

        // Everything before END: the guest still runs.
        Assert.Equal(endAt, enc.Consume(stream.AsSpan(0, endAt), isFinal: false));
        Assert.False(enc.SourcePaused);
        Assert.DoesNotContain(MigOps.Paused, enc.Ops.ToArray());
        CoreTrip.Ship(enc, dec, output);
        Assert.False(dec.SourcePaused);

        // END's header: paused from here on, said once.
        int consumed = enc.Consume(stream.AsSpan(endAt), isFinal: true);
        Assert.True(enc.SourcePaused);
        var ops = enc.Ops.ToArray();
        // RAW of END's 5-byte header (type, section id), then PAUSED, then END's pages.
        Assert.Equal(MigOps.Raw, ops[0]);
        Assert.Equal(5u, System.Buffers.Binary.BinaryPrimitives.ReadUInt32BigEndian(ops.AsSpan(1)));
        Assert.Equal(stream.AsSpan(endAt, 5).ToArray(), ops.AsSpan(5, 5).ToArray());
        Assert.Equal(MigOps.Paused, ops[10]);
        Assert.Single(ops, op => op == MigOps.Paused);
        CoreTrip.Ship(enc, dec, output);
        Assert.True(dec.SourcePaused);
        Assert.Equal(stream.AsSpan(0, endAt + consumed).ToArray(), output.ToArray());
    }

    [Fact]
    public void A_second_paused_op_is_refused_by_name()
    {
        using var dir = new TempDir();
        using var store = MemoryStore.Open(dir.Path, Guid.NewGuid());
        var dec = new MigDecoder(store, keep: false, seed: 1, new TransferStats());
        var e = Assert.Throws<BFMig.Transfer.Wire.PeerProtocolException>(() => dec.Process([MigOps.Paused, MigOps.Paused], 0));
        Assert.Contains("second PAUSED", e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void A_paused_op_after_the_end_frame_is_refused_by_name()
    {
        using var dir = new TempDir();
        using var store = MemoryStore.Open(dir.Path, Guid.NewGuid());
        var dec = new MigDecoder(store, keep: false, seed: 1, new TransferStats());
        dec.Seal();
        var e = Assert.Throws<BFMig.Transfer.Wire.PeerProtocolException>(() => dec.Process([MigOps.Paused], 0));
        Assert.Contains("PAUSED after the end frame", e.Message, StringComparison.Ordinal);
        Assert.False(dec.SourcePaused);
    }
}
