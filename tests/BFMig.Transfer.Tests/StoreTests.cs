using System.Diagnostics;
using BFMig.Transfer.Memory;
using BFMig.Transfer.Store;

namespace BFMig.Transfer.Tests;

public class StoreTests
{
    private static readonly RamBlockInfo[] Layout = [new("pc.ram", 16 * 4096), new("pc.bios", 2 * 4096)];

    private static byte[] Content(int seed)
    {
        var b = new byte[4096];
        new Random(seed).NextBytes(b);
        return b;
    }

    private static void AssertIndexMatchesData(MemoryStore s)
    {
        for (int b = 0; b < s.BlockCount; b++)
        {
            for (long p = 0; p < s.PageCount(b); p++)
            {
                var h = s.GetHash(b, p);
                if (h != UInt128.Zero) Assert.Equal(s.Hash(s.Page(b, p)), h);
            }
        }
    }

    // A trip keeps the departure content of each page it changes, buffered 64 pages at a time
    // before it reaches the scratch file: pages on both sides of each boundary read back exactly.
    [Fact]
    public void Departure_copies_read_back_exactly_across_the_scratch_files_buffer_boundaries()
    {
        using var dir = new TempDir();
        const int Pages = 150;
        RamBlockInfo[] layout = [new("pc.ram", Pages * 4096L)];
        using var s = MemoryStore.Open(dir.Path, Guid.NewGuid());
        s.BeginTrip(layout, s.State.Seed, keep: false, buildLocator: false);
        for (int p = 0; p < Pages; p++) s.Put(0, p, Content(p), s.Hash(Content(p)));
        s.Commit(1, "peer", snapshotComplete: true);

        s.BeginTrip(layout, s.State.Seed, keep: true, buildLocator: false);
        for (int p = 0; p < Pages; p++) s.Put(0, p, Content(1000 + p), s.Hash(Content(1000 + p)));
        var read = new byte[4096];
        foreach (int p in (int[])[0, 63, 64, 65, 127, 128, 129, Pages - 1])
        {
            Assert.Equal(s.Hash(Content(p)), s.BaseHash(0, p));
            s.ReadBase(0, p, read);
            Assert.Equal(Content(p), read);
            Assert.Equal(Content(1000 + p), s.Page(0, p).ToArray());
        }
        s.Commit(2, "peer", snapshotComplete: true);
    }

    // A zero page over the hole a new data file is made of is recorded in the index alone; over
    // bytes anything wrote since (a page made unknown afterwards, or one still buffered) zeros are
    // written, so the data file always holds what the index says.
    [Fact]
    public void A_zero_page_is_written_unless_it_lies_in_a_new_data_files_hole()
    {
        using var dir = new TempDir();
        var guest = Guid.NewGuid();
        var zeros = new byte[4096];
        using (var s = MemoryStore.Open(dir.Path, guest))
        {
            s.BeginTrip(Layout, s.State.Seed, keep: false, buildLocator: false);
            for (int p = 0; p < 3; p++) s.Put(0, p, Content(p), s.Hash(Content(p)));
            s.PutZero(0, 3);                                   // never written: left a hole
            s.Put(0, 5, Content(5), s.Hash(Content(5)));
            Assert.Equal(Content(5), s.Page(0, 5).ToArray());  // flushed to the file
            s.PutUnknown(0, 5);
            s.PutZero(0, 5);                                   // its bytes are Content(5): written
            s.Put(0, 7, Content(7), s.Hash(Content(7)));       // still buffered
            s.PutUnknown(0, 7);
            s.PutZero(0, 7);                                   // buffered bytes: written over
            Assert.Equal(1, s.ZeroPagesUnwritten);
            s.Commit(1, "peer", snapshotComplete: true);
        }
        string data = Directory.GetFiles(Path.Combine(dir.Path, guest.ToString(), "mem"), "*.pages").OrderByDescending(f => new FileInfo(f).Length).First();
        var bytes = File.ReadAllBytes(data);
        foreach (int p in (int[])[3, 5, 7]) Assert.Equal(zeros, bytes[(p * 4096)..((p + 1) * 4096)]);
        using (var s = MemoryStore.Open(dir.Path, guest))
        {
            foreach (int p in (int[])[3, 5, 7]) Assert.Equal(s.ZeroHash, s.GetHash(0, p));
            AssertIndexMatchesData(s);
            // The file existed when this store opened: no page of it counts as a hole any more.
            s.BeginTrip(Layout, s.State.Seed, keep: true, buildLocator: false);
            s.PutZero(0, 9);
            Assert.Equal(0, s.ZeroPagesUnwritten);
            s.Commit(2, "peer", snapshotComplete: true);
        }
    }

    // A zero page over a hole changes the index alone, and the index files are rewritten at the
    // commit before the state: a commit cut short there must leave that page in doubt, as it does
    // a page whose data the trip wrote.
    [Fact]
    public void A_commit_cut_short_leaves_a_zero_page_left_as_a_hole_in_doubt()
    {
        using var dir = new TempDir();
        var guest = Guid.NewGuid();
        string state = Path.Combine(dir.Path, guest.ToString(), "mem", "state.json");
        using (var s = MemoryStore.Open(dir.Path, guest))
        {
            s.BeginTrip(Layout, s.State.Seed, keep: false, buildLocator: false);
            for (int p = 0; p < 8; p++) s.Put(0, p, Content(p), s.Hash(Content(p)));
            s.Commit(1, "peer", snapshotComplete: true);
            s.BeginTrip(Layout, s.State.Seed, keep: true, buildLocator: false);
            s.PutZero(0, 9);
            Assert.Equal(1, s.ZeroPagesUnwritten);
            Directory.CreateDirectory(state + ".tmp"); // the state's write fails after the index files'
            Assert.Throws<UnauthorizedAccessException>(() => s.Commit(2, "peer", snapshotComplete: true));
        }
        Directory.Delete(state + ".tmp");
        using (var s = MemoryStore.Open(dir.Path, guest))
        {
            Assert.Equal(1UL, s.State.Generation);
            Assert.Equal([new PageRange(0, 9, 1)], s.Doubt.Ranges);
        }
    }

    /// <summary>
    /// A stream that finds its guest's store held by the trip before (committing once the guest
    /// runs, a moment after the stream ended) waits for it rather than carrying everything without
    /// it; a caller that does not wait is refused at once, by name.
    /// </summary>
    [Fact]
    public async Task A_store_held_by_the_trip_before_is_waited_for_up_to_the_lock_wait()
    {
        using var dir = new TempDir();
        var guest = Guid.NewGuid();
        var held = MemoryStore.Open(dir.Path, guest);
        var e = Assert.Throws<StoreException>(() => MemoryStore.Open(dir.Path, guest));
        Assert.Contains("in use by another helper", e.Message);
        var released = Task.Run(async () =>
        {
            await Task.Delay(400);
            held.Dispose();
        });
        var waited = System.Diagnostics.Stopwatch.StartNew();
        using var s = MemoryStore.Open(dir.Path, guest, TimeSpan.FromSeconds(20));
        Assert.InRange(waited.Elapsed, TimeSpan.FromMilliseconds(300), TimeSpan.FromSeconds(19));
        await released;
    }

    [Fact]
    public void Committed_trip_survives_reopen_with_layout_hashes_and_state()
    {
        using var dir = new TempDir();
        var guest = Guid.NewGuid();
        string digest;
        ulong seed;
        using (var s = MemoryStore.Open(dir.Path, guest))
        {
            seed = s.State.Seed;
            s.BeginTrip(Layout, seed, keep: false, buildLocator: true);
            s.Put(0, 3, Content(3), s.Hash(Content(3)));
            s.PutZero(0, 4);
            s.PutUnknown(0, 5);
            digest = s.Commit(7, "hostB", snapshotComplete: true);
        }
        using (var s = MemoryStore.Open(dir.Path, guest))
        {
            Assert.False(s.Recovered);
            Assert.Equal(7UL, s.State.Generation);
            Assert.Equal(digest, s.State.Digest);
            Assert.Equal(seed, s.State.Seed);
            Assert.Equal("hostB", s.State.Peer);
            Assert.Equal(digest, s.ComputeDigest());
            Assert.Equal(s.Hash(Content(3)), s.GetHash(0, 3));
            Assert.Equal(s.ZeroHash, s.GetHash(0, 4));
            Assert.Equal(UInt128.Zero, s.GetHash(0, 5));
            Assert.Equal(Content(3), s.Page(0, 3).ToArray());
            Assert.True(Directory.Exists(s.DiskDirectory));
        }
        Assert.True(File.Exists(Path.Combine(dir.Path, guest.ToString(), "mem", "blocks.json")));
    }

    [Fact]
    public void Paced_writeback_keeps_every_page_including_rewrites_after_their_chunk_was_queued()
    {
        // 24 MiB: three writeback chunks, so chunks are started and waited for while pages in
        // them are rewritten, read back mid-trip and written out of order.
        using var dir = new TempDir();
        var guest = Guid.NewGuid();
        const int Pages = 6144;
        RamBlockInfo[] layout = [new("pc.ram", Pages * 4096L)];
        var expected = new Dictionary<long, byte[]>();
        using (var s = MemoryStore.Open(dir.Path, guest))
        {
            s.PacedWriteback = true;
            s.BeginTrip(layout, s.State.Seed, keep: false, buildLocator: false);
            for (long p = 0; p < Pages; p++) Put(s, p, (int)p);
            for (long p = 17; p < Pages; p += 509) Put(s, p, (int)p + 100_000);      // rewrites behind the writeback
            for (long p = Pages - 1; p >= 0; p -= 1021) Put(s, p, (int)p + 200_000);  // backwards
            Assert.Equal(expected[17], s.Page(0, 17).ToArray());
            s.Commit(1, "peer", snapshotComplete: true);
        }
        using (var s = MemoryStore.Open(dir.Path, guest))
        {
            foreach (var (p, content) in expected)
            {
                Assert.Equal(content, s.Page(0, p).ToArray());
                Assert.Equal(s.Hash(content), s.GetHash(0, p));
            }
        }

        void Put(MemoryStore s, long page, int seed)
        {
            var c = Content(seed);
            expected[page] = c;
            s.Put(0, page, c, s.Hash(c));
        }
    }

    [Fact]
    public void A_second_helper_cannot_open_a_store_in_use()
    {
        using var dir = new TempDir();
        var guest = Guid.NewGuid();
        using var s = MemoryStore.Open(dir.Path, guest);
        var e = Assert.Throws<StoreException>(() => MemoryStore.Open(dir.Path, guest));
        Assert.Contains("in use", e.Message);
    }

    [Fact]
    public void Interrupted_trip_keeps_the_committed_index_minus_what_its_journal_names()
    {
        using var dir = new TempDir();
        var guest = Guid.NewGuid();
        using (var s = MemoryStore.Open(dir.Path, guest))
        {
            s.BeginTrip(Layout, s.State.Seed, keep: false, buildLocator: false);
            for (int p = 0; p < 16; p++) s.Put(0, p, Content(p), s.Hash(Content(p)));
            s.Commit(3, "hostB", snapshotComplete: true);
        }
        // A trip starts, writes some pages, and the process dies (no commit, no abandon): page 1
        // reached the file (the write to page 7 flushed it), page 7 was still buffered.
        using (var s = MemoryStore.Open(dir.Path, guest))
        {
            s.BeginTrip(Layout, s.State.Seed, keep: true, buildLocator: true);
            s.Put(0, 1, Content(100), s.Hash(Content(100)));
            s.Put(0, 7, Content(107), s.Hash(Content(107)));
        }
        using (var s = MemoryStore.Open(dir.Path, guest))
        {
            Assert.False(s.Recovered);
            Assert.Equal(3UL, s.State.Generation);
            Assert.Equal("hostB", s.State.Peer);
            Assert.Equal(s.State.Digest, s.ComputeDigest());
            Assert.Equal([new PageRange(0, 1, 1)], s.Doubt.Ranges);
            Assert.Equal(Content(100), s.Page(0, 1).ToArray());
            Assert.Equal(Content(7), s.Page(0, 7).ToArray());
            for (int p = 0; p < 16; p++)
                if (p != 1) Assert.Equal(s.Hash(s.Page(0, p)), s.GetHash(0, p));
        }
    }

    [Fact]
    public void Truncated_data_and_index_files_never_leave_a_wrong_hash()
    {
        using var dir = new TempDir();
        var guest = Guid.NewGuid();
        using (var s = MemoryStore.Open(dir.Path, guest))
        {
            s.BeginTrip(Layout, s.State.Seed, keep: false, buildLocator: false);
            for (int p = 0; p < 16; p++) s.Put(0, p, Content(p), s.Hash(Content(p)));
            s.Commit(3, "hostB", snapshotComplete: true);
        }
        string mem = Path.Combine(dir.Path, guest.ToString(), "mem");
        File.WriteAllText(Path.Combine(mem, "INFLUX"), "");
        var data = Directory.GetFiles(mem, "*.pages").OrderBy(f => new FileInfo(f).Length).Last();
        using (var f = new FileStream(data, FileMode.Open)) f.SetLength(5 * 4096 + 100);
        foreach (var h in Directory.GetFiles(mem, "*.hash")) using (var f = new FileStream(h, FileMode.Open)) f.SetLength(33);
        using (var s = MemoryStore.Open(dir.Path, guest))
        {
            Assert.True(s.Recovered);
            AssertIndexMatchesData(s);
            Assert.Equal(s.Hash(Content(4)), s.GetHash(0, 4));
            Assert.Equal(s.ZeroHash, s.GetHash(0, 9));
        }
    }

    [Fact]
    public void A_truncated_index_without_influx_means_unknown_not_wrong()
    {
        using var dir = new TempDir();
        var guest = Guid.NewGuid();
        using (var s = MemoryStore.Open(dir.Path, guest))
        {
            s.BeginTrip(Layout, s.State.Seed, keep: false, buildLocator: false);
            s.Put(0, 0, Content(1), s.Hash(Content(1)));
            s.Commit(1, "x", snapshotComplete: true);
        }
        string mem = Path.Combine(dir.Path, guest.ToString(), "mem");
        foreach (var h in Directory.GetFiles(mem, "*.hash")) using (var f = new FileStream(h, FileMode.Open)) f.SetLength(17);
        using (var s = MemoryStore.Open(dir.Path, guest))
        {
            Assert.Equal(UInt128.Zero, s.GetHash(0, 0));
            Assert.NotEqual(s.State.Digest, s.ComputeDigest());
        }
    }

    [Fact]
    public void Killed_helper_mid_trip_leaves_a_recoverable_store()
    {
        // A real crash: a child process writes pages in a trip and is SIGKILLed.
        using var dir = new TempDir();
        var guest = Guid.NewGuid();
        using (var s = MemoryStore.Open(dir.Path, guest))
        {
            s.BeginTrip(Layout, s.State.Seed, keep: false, buildLocator: false);
            s.Commit(2, "x", snapshotComplete: true);
        }
        string mem = Path.Combine(dir.Path, guest.ToString(), "mem");
        string pages = Directory.GetFiles(mem, "*.pages").OrderBy(f => new FileInfo(f).Length).Last();
        File.WriteAllText(Path.Combine(mem, "INFLUX"), "");
        var psi = new ProcessStartInfo("dd", $"if=/dev/urandom of={pages} bs=1 count=65536 conv=notrunc") { RedirectStandardError = true };
        using (var p = Process.Start(psi)!)
        {
            Thread.Sleep(20);
            p.Kill();
            p.WaitForExit();
        }
        using (var s = MemoryStore.Open(dir.Path, guest))
        {
            Assert.True(s.Recovered);
            AssertIndexMatchesData(s);
            Assert.Equal(0UL, s.State.Generation);
        }
    }

    [Fact]
    public void Abandoned_trip_keeps_the_committed_index_and_names_the_pages_it_wrote()
    {
        using var dir = new TempDir();
        var guest = Guid.NewGuid();
        using (var s = MemoryStore.Open(dir.Path, guest))
        {
            s.BeginTrip(Layout, s.State.Seed, keep: false, buildLocator: false);
            s.Put(0, 0, Content(1), s.Hash(Content(1)));
            s.Commit(5, "x", snapshotComplete: true);
            s.BeginTrip(Layout, s.State.Seed, keep: true, buildLocator: false);
            s.Put(0, 0, Content(2), s.Hash(Content(2)));
            s.Put(0, 5, Content(5), s.Hash(Content(5))); // flushes page 0; itself still buffered, so dropped
            s.Abandon();
            Assert.Equal([new PageRange(0, 0, 1)], s.Doubt.Ranges);
        }
        using (var s = MemoryStore.Open(dir.Path, guest))
        {
            Assert.False(s.Recovered);
            Assert.Equal(5UL, s.State.Generation);
            Assert.Equal([new PageRange(0, 0, 1)], s.Doubt.Ranges);
            Assert.Equal(s.Hash(Content(1)), s.GetHash(0, 0));
            Assert.Equal(Content(2), s.Page(0, 0).ToArray());
            Assert.Equal(UInt128.Zero, s.GetHash(0, 5));
            Assert.Equal(new byte[4096], s.Page(0, 5).ToArray());
        }
    }

    [Fact]
    public void Layout_changes_keep_matching_blocks_only()
    {
        using var dir = new TempDir();
        var guest = Guid.NewGuid();
        using var s = MemoryStore.Open(dir.Path, guest);
        s.BeginTrip(Layout, s.State.Seed, keep: false, buildLocator: false);
        s.Put(0, 0, Content(1), s.Hash(Content(1)));
        s.Put(1, 0, Content(2), s.Hash(Content(2)));
        s.Commit(1, "x", snapshotComplete: true);
        s.BeginTrip([new("pc.bios", 2 * 4096), new("pc.ram", 32 * 4096)], s.State.Seed, keep: true, buildLocator: false);
        Assert.Equal(s.Hash(Content(2)), s.GetHash(0, 0));   // pc.bios kept (now first)
        Assert.Equal(UInt128.Zero, s.GetHash(1, 0));         // pc.ram resized: forgotten
        s.Commit(2, "x", snapshotComplete: true);
        Assert.Equal(2, Directory.GetFiles(Path.Combine(dir.Path, guest.ToString(), "mem"), "*.pages").Length);
    }
}
