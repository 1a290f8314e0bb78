using System.Buffers.Binary;
using System.IO.Hashing;
using BFMig.Transfer.Memory;
using BFMig.Transfer.Wire;

namespace BFMig.Transfer.Tests;

/// <summary>
/// A memory trip that fails keeps both stores usable for every page it did not write: the doubt
/// journal (<c>mem/INFLUX</c>), its crash cases, and the union of both hosts' doubt.
/// </summary>
public class MemoryDoubtTests
{
    private const int Pages = 256;

    private static byte[] Page(int seed)
    {
        var b = new byte[4096];
        new Random(seed).NextBytes(b);
        return b;
    }

    private static List<(string, byte[][])> Guest(int seed) =>
        [("pc.ram", Enumerable.Range(0, Pages).Select(p => Page(seed * 100_000 + p)).ToArray()), ("pc.bios", [Page(seed - 1), Page(seed - 2)])];

    public enum Fail { None, Abandon, Kill }

    /// <summary>
    /// One trip as the helpers run it (encoder, decoder, both hosts' doubt exchanged), cut after
    /// <paramref name="cutAt"/> stream bytes with <paramref name="fail"/>: both sides abandon, or
    /// both processes die (stores disposed as they are). Returns the sender's stats.
    /// </summary>
    private static TransferStats Trip(byte[] stream, MemoryStore sender, MemoryStore receiver, Fail fail = Fail.None, int cutAt = int.MaxValue)
    {
        bool synced = sender.State.Generation != 0 && sender.State.Generation == receiver.State.Generation
            && sender.State.Digest == receiver.State.Digest && sender.State.Seed == receiver.State.Seed;
        var ss = new TransferStats();
        var rs = new TransferStats();
        var enc = new MigEncoder(sender, synced, sender.State.Seed, ss) { PeerDoubt = synced ? receiver.Doubt : MemoryDoubt.None };
        var dec = new MigDecoder(receiver, synced, sender.State.Seed, rs) { PeerDoubt = sender.Doubt };
        using var output = new MemoryStream();
        void Ship() => CoreTrip.Ship(enc, dec, output);
        int end = Math.Min(stream.Length, cutAt);
        int start = 0, fed = 0;
        while (true)
        {
            bool final = fed == stream.Length;
            start += enc.Consume(stream.AsSpan(start, fed - start), final);
            if (enc.OpsLength >= MigEncoder.FlushThreshold) { Ship(); continue; }
            if ((final && start == fed) || fed == end && fed != stream.Length) break;
            fed = Math.Min(end, fed + 8192);
        }
        Ship();
        if (fail == Fail.Abandon)
        {
            sender.Abandon();
            receiver.Abandon();
            return ss;
        }
        if (fail == Fail.Kill) return ss;
        Assert.Equal(stream, output.ToArray());
        Assert.Equal(sender.ComputeDigest(), receiver.ComputeDigest());
        ulong gen = Math.Max(sender.State.Generation, receiver.State.Generation) + 1;
        receiver.Commit(gen, "a", true);
        sender.Commit(gen, "b", true);
        Assert.Equal(ss.PagesElided, rs.PagesElided);
        return ss;
    }

    private static string Mem(string root, Guid guest) => Path.Combine(root, guest.ToString(), "mem");

    private static void AssertTrueOutsideDoubt(MemoryStore s)
    {
        for (int b = 0; b < s.BlockCount; b++)
        {
            for (long p = 0; p < s.PageCount(b); p++)
            {
                var h = s.GetHash(b, p);
                bool doubted = s.Doubt.Whole || s.Doubt.Ranges.Any(r => r.Block == b && r.First <= p && p < r.End);
                if (h != UInt128.Zero && !doubted) Assert.Equal(s.Hash(s.Page(b, p)), h);
            }
        }
    }

    /// <summary>A: guest went A -> B; B changed <paramref name="changed"/> pages; returns B's new memory.</summary>
    private static List<(string, byte[][])> FirstTripAndChange(string rootA, string rootB, Guid guest, int changed)
    {
        var mem = Guest(7);
        using (var a = MemoryStore.Open(rootA, guest))
        using (var b = MemoryStore.Open(rootB, guest))
            Trip(StreamBuilder.FullStream(mem), a, b);
        for (int i = 0; i < changed; i++)
            mem[0].Item2[i * 5 + 3] = Page(900_000 + i);
        return mem;
    }

    [Theory]
    [InlineData(Fail.Abandon)]
    [InlineData(Fail.Kill)]
    public void A_failed_return_trip_costs_the_retry_only_what_it_wrote(Fail fail)
    {
        using var dirA = new TempDir();
        using var dirB = new TempDir();
        var guest = Guid.NewGuid();
        var mem = FirstTripAndChange(dirA.Path, dirB.Path, guest, changed: 20);
        var back = StreamBuilder.FullStream(mem);
        using (var b = MemoryStore.Open(dirB.Path, guest))
        using (var a = MemoryStore.Open(dirA.Path, guest))
            Trip(back, b, a, fail, cutAt: back.Length * 3 / 4);
        using (var b = MemoryStore.Open(dirB.Path, guest))
        using (var a = MemoryStore.Open(dirA.Path, guest))
        {
            Assert.False(a.Recovered || b.Recovered);
            Assert.Equal(1UL, a.State.Generation);
            Assert.Equal(a.State.Digest, b.State.Digest);
            // Only changed pages were written (in the first 3/4 of the stream), and only those are in doubt.
            Assert.InRange(b.Doubt.PageCount, 1, 20);
            Assert.InRange(a.Doubt.PageCount, 0, 20);
            AssertTrueOutsideDoubt(a);
            AssertTrueOutsideDoubt(b);
            var retry = Trip(back, b, a);
            Assert.Equal(20, retry.PagesFull);
            Assert.Equal(Pages + 2 - 20, retry.PagesElided);
        }
        foreach (var root in new[] { dirA.Path, dirB.Path })
            Assert.False(File.Exists(Path.Combine(Mem(root, guest), "INFLUX")));
    }

    [Fact]
    public void Both_hosts_start_a_trip_from_the_union_of_their_doubts()
    {
        using var dirA = new TempDir();
        using var dirB = new TempDir();
        var guest = Guid.NewGuid();
        var mem = Guest(3);
        using (var a = MemoryStore.Open(dirA.Path, guest))
        using (var b = MemoryStore.Open(dirB.Path, guest))
            Trip(StreamBuilder.FullStream(mem), a, b);
        // Each host has its own pages in doubt (as two failed trips could leave them).
        MemoryDoubtJournal.WriteSettled(Mem(dirA.Path, guest), MemoryDoubt.Of([new PageRange(0, 10, 3)]));
        MemoryDoubtJournal.WriteSettled(Mem(dirB.Path, guest), MemoryDoubt.Of([new PageRange(0, 12, 4), new PageRange(1, 1, 1)]));
        using (var a = MemoryStore.Open(dirA.Path, guest))
        using (var b = MemoryStore.Open(dirB.Path, guest))
        {
            var back = StreamBuilder.FullStream(mem);
            var stats = Trip(back, b, a);
            Assert.Equal([new PageRange(0, 10, 6), new PageRange(1, 1, 1)], a.TripDoubt.Ranges);
            Assert.Equal(a.TripDoubt.Ranges, b.TripDoubt.Ranges);
            Assert.Equal(7, stats.MemDoubtPages);
            Assert.Equal(7, stats.PagesFull);
            Assert.Equal(Pages + 2 - 7, stats.PagesElided);
        }
    }

    [Fact]
    public void A_damaged_journal_puts_the_whole_store_in_doubt()
    {
        foreach (var damage in new Action<string>[]
        {
            path => { var b = File.ReadAllBytes(path); b[^5] ^= 0x10; File.WriteAllBytes(path, b); },     // a record's bytes
            path => { var b = File.ReadAllBytes(path); File.WriteAllBytes(path, b[..^7]); },              // torn record
            path => { var b = File.ReadAllBytes(path); b[3] ^= 1; File.WriteAllBytes(path, b); },         // header
            path => File.WriteAllBytes(path, []),                                                          // older helpers' marker
        })
        {
            using var dirA = new TempDir();
            using var dirB = new TempDir();
            var guest = Guid.NewGuid();
            var mem = FirstTripAndChange(dirA.Path, dirB.Path, guest, changed: 10);
            using (var b = MemoryStore.Open(dirB.Path, guest))
            using (var a = MemoryStore.Open(dirA.Path, guest))
                Trip(StreamBuilder.FullStream(mem), b, a, Fail.Abandon, cutAt: int.MaxValue);
            damage(Path.Combine(Mem(dirA.Path, guest), "INFLUX"));
            Assert.Null(MemoryStore.Peek(dirA.Path, guest));
            using (var a = MemoryStore.Open(dirA.Path, guest))
            {
                Assert.True(a.Recovered);
                Assert.Equal(0UL, a.State.Generation);
                Assert.True(a.Doubt.IsEmpty);
                AssertTrueOutsideDoubt(a);
                Assert.False(File.Exists(Path.Combine(Mem(dirA.Path, guest), "INFLUX")));
            }
        }
    }

    [Fact]
    public void A_live_journal_of_another_boot_puts_the_whole_store_in_doubt_and_one_of_this_boot_is_settled()
    {
        using var dirA = new TempDir();
        using var dirB = new TempDir();
        var guest = Guid.NewGuid();
        var mem = FirstTripAndChange(dirA.Path, dirB.Path, guest, changed: 10);
        using (var b = MemoryStore.Open(dirB.Path, guest))
        using (var a = MemoryStore.Open(dirA.Path, guest))
            Trip(StreamBuilder.FullStream(mem), b, a, Fail.Kill, cutAt: int.MaxValue);
        // B's helper was killed: its live journal is stamped with this boot.
        string journal = Path.Combine(Mem(dirB.Path, guest), "INFLUX");
        var live = File.ReadAllBytes(journal);
        Assert.NotEqual(new byte[16], live[8..24]);
        Assert.False(MemoryDoubtJournal.Read(Mem(dirB.Path, guest), out bool isLive).Whole);
        Assert.True(isLive);
        // The same journal from another boot (the machine crashed: the page cache it relied on is gone).
        var otherBoot = (byte[])live.Clone();
        otherBoot[8] ^= 0xff;
        BinaryPrimitives.WriteUInt64LittleEndian(otherBoot.AsSpan(24), XxHash64.HashToUInt64(otherBoot.AsSpan(0, 24)));
        File.WriteAllBytes(journal, otherBoot);
        Assert.True(MemoryDoubtJournal.Read(Mem(dirB.Path, guest), out _).Whole);
        // And as it is: opening settles it (no boot id) with the same pages.
        File.WriteAllBytes(journal, live);
        var before = MemoryDoubtJournal.Read(Mem(dirB.Path, guest), out _);
        using (var b = MemoryStore.Open(dirB.Path, guest))
        {
            Assert.False(b.Recovered);
            Assert.True(b.Doubt.SameAs(before));
            Assert.InRange(b.Doubt.PageCount, 1, 10);
        }
        Assert.Equal(new byte[16], File.ReadAllBytes(journal)[8..24]);
        Assert.True(MemoryDoubtJournal.Read(Mem(dirB.Path, guest), out isLive).SameAs(before));
        Assert.False(isLive);
    }

    [Fact]
    public void A_crash_between_journal_and_write_or_inside_a_commit_still_elides_nothing_on_a_guess()
    {
        using var dirA = new TempDir();
        using var dirB = new TempDir();
        var guest = Guid.NewGuid();
        var mem = FirstTripAndChange(dirA.Path, dirB.Path, guest, changed: 10);
        // A page journaled whose write never happened: in doubt all the same (sent in full, not trusted either way).
        using (var a = MemoryStore.Open(dirA.Path, guest))
        {
            var j = MemoryDoubtJournal.Begin(Mem(dirA.Path, guest), a.Doubt);
            j.Touching(0, 100, 2);
            j.Dispose();
        }
        // A commit killed after it rewrote B's index files but before its state: the journal covers what changed.
        using (var b = MemoryStore.Open(dirB.Path, guest))
        {
            b.BeginTrip(QemuStreamParserProbeBlocks(mem), b.State.Seed, keep: true, buildLocator: false);
            b.Put(0, 40, Page(1), b.Hash(Page(1)));
            b.Put(0, 42, Page(2), b.Hash(Page(2)));
            b.PutUnknown(0, 50);
            var state = File.ReadAllBytes(Path.Combine(Mem(dirB.Path, guest), "state.json"));
            b.Commit(9, "x", true);
            File.WriteAllBytes(Path.Combine(Mem(dirB.Path, guest), "state.json"), state);
        }
        var journal = Path.Combine(Mem(dirB.Path, guest), "INFLUX");
        Assert.False(File.Exists(journal));
        // Put the live journal back as the kill would have left it (the commit removes it last).
        MemoryDoubtJournal.WriteSettled(Mem(dirB.Path, guest), MemoryDoubt.Of([new PageRange(0, 40, 1), new PageRange(0, 42, 1), new PageRange(0, 50, 1)]));
        using (var b = MemoryStore.Open(dirB.Path, guest))
        using (var a = MemoryStore.Open(dirA.Path, guest))
        {
            Assert.Equal(1UL, b.State.Generation);
            Assert.Equal([new PageRange(0, 100, 2)], a.Doubt.Ranges);
            var stats = Trip(StreamBuilder.FullStream(mem), b, a);
            Assert.Equal(5, stats.MemDoubtPages);
            Assert.Equal(10 + 5, stats.PagesFull);
        }
    }

    private static List<RamBlockInfo> QemuStreamParserProbeBlocks(List<(string Name, byte[][] Pages)> mem) =>
        mem.Select(m => new RamBlockInfo(m.Name, m.Pages.Length * 4096L)).ToList();

    [Fact]
    public void Damaged_pages_found_by_a_trip_go_in_doubt_and_indexes_that_differ_put_the_whole_store_there()
    {
        using var dirA = new TempDir();
        using var dirB = new TempDir();
        var guest = Guid.NewGuid();
        var mem = FirstTripAndChange(dirA.Path, dirB.Path, guest, changed: 0);
        // Something other than a trip writes A's page file: no journal can know.
        var pages = Directory.GetFiles(Mem(dirA.Path, guest), "*.pages").OrderBy(f => new FileInfo(f).Length).Last();
        using (var f = new FileStream(pages, FileMode.Open)) { f.Position = 4096 * 9 + 7; f.WriteByte(0x42); f.Position = 4096 * 200; f.WriteByte(0x42); }
        using (var b = MemoryStore.Open(dirB.Path, guest))
        using (var a = MemoryStore.Open(dirA.Path, guest))
        {
            var e = Assert.Throws<StoreOutOfStepException>(() => Trip(StreamBuilder.FullStream(mem), b, a));
            Assert.Contains("not retained here", e.Message);
            Assert.True(e.PagesDiffer);
            Assert.True(a.Abandon(MigReceiver.FaultOf(e)));
            Assert.True(b.Abandon());
        }
        // A rehashed its pages: the two that differ from its committed index are in doubt, nothing else.
        using (var b = MemoryStore.Open(dirB.Path, guest))
        using (var a = MemoryStore.Open(dirA.Path, guest))
        {
            Assert.Equal(1UL, a.State.Generation);
            Assert.Equal([new PageRange(0, 9, 1), new PageRange(0, 200, 1)], a.Doubt.Ranges);
            var retry = Trip(StreamBuilder.FullStream(mem), b, a);
            Assert.Equal(2, retry.PagesFull);
        }
        // Indexes that differ (a digest check failed) cannot be followed page by page.
        using (var a = MemoryStore.Open(dirA.Path, guest))
        {
            a.BeginTrip(QemuStreamParserProbeBlocks(mem), a.State.Seed, keep: true, buildLocator: false);
            Assert.True(a.Abandon(MemoryStore.StoreFault.IndexesDiffer));
        }
        using (var a = MemoryStore.Open(dirA.Path, guest))
        {
            Assert.Equal(0UL, a.State.Generation);
            Assert.True(a.Doubt.IsEmpty);
            AssertTrueOutsideDoubt(a);
        }
    }

    [Fact]
    public void Doubt_merges_coarsens_to_its_limit_and_round_trips_on_the_wire()
    {
        var d = MemoryDoubt.Of([new PageRange(0, 5, 2), new PageRange(0, 7, 1), new PageRange(1, 0, 1), new PageRange(0, 1, 1), new PageRange(0, 0, 0)]);
        Assert.Equal([new PageRange(0, 1, 1), new PageRange(0, 5, 3), new PageRange(1, 0, 1)], d.Ranges);
        var (back, length) = MemoryDoubt.Decode(d.Encode())!.Value;
        Assert.True(back.SameAs(d));
        Assert.Equal(d.EncodedLength, length);
        Assert.True(MemoryDoubt.Decode(MemoryDoubt.All.Encode())!.Value.Doubt.Whole);

        // Scattered pages beyond the limit: merged across the smallest gaps, never dropped.
        var scattered = Enumerable.Range(0, 3 * MemoryDoubt.MaxRanges).Select(i => new PageRange(0, i * 3L, 1)).ToList();
        var coarse = MemoryDoubt.Of(scattered);
        Assert.InRange(coarse.Ranges.Count, 1, MemoryDoubt.MaxRanges);
        Assert.All(scattered, s => Assert.Contains(coarse.Ranges, r => r.Block == s.Block && r.First <= s.First && s.End <= r.End));
        Assert.True(coarse.PageCount < 3L * 3 * MemoryDoubt.MaxRanges);

        var union = MemoryDoubt.Of([new PageRange(0, 0, 2)]).Union(MemoryDoubt.Of([new PageRange(0, 2, 2), new PageRange(2, 9, 1)]));
        Assert.Equal([new PageRange(0, 0, 4), new PageRange(2, 9, 1)], union.Ranges);
        Assert.True(union.Union(MemoryDoubt.All).Whole);

        // Not canonical (out of order, overlapping or adjacent): refused, so what decodes re-encodes to the same bytes.
        var twisted = MemoryDoubt.Of([new PageRange(0, 1, 1), new PageRange(0, 5, 1)]).Encode();
        Assert.Null(MemoryDoubt.Decode([.. twisted[..5], .. twisted[25..45], .. twisted[5..25]]));
        BinaryPrimitives.WriteInt64BigEndian(twisted.AsSpan(25 + 4), 2);
        Assert.Null(MemoryDoubt.Decode(twisted));
        foreach (var bad in new byte[][] { [], [2, 0, 0, 0, 0], [1, 0, 0, 0, 1], [0, 0, 0, 0, 1], [0, 0x7f, 0xff, 0xff, 0xff],
                     [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0] })
            Assert.Null(MemoryDoubt.Decode(bad));
    }

    [Fact]
    public void The_hello_reply_carries_the_receivers_doubt_under_its_proof()
    {
        var doubt = MemoryDoubt.Of([new PageRange(0, 3, 9), new PageRange(1, 0, 1)]);
        var reply = new HelloReply(HelloStatus.Match, true, 4, new byte[16], new byte[32], "") { Doubt = doubt };
        var unsigned = reply.EncodeUnsigned();
        byte[] signed = [.. unsigned, 2, 9, 9];
        var (decoded, length, proof) = HelloReply.Decode(signed);
        Assert.True(decoded.Doubt.SameAs(doubt));
        Assert.Equal(unsigned.Length, length);
        Assert.Equal([9, 9], proof);
        Assert.Throws<PeerProtocolException>(() => HelloReply.Decode(signed[..^4]));
    }
}
