using BFMig.Transfer.Disk;
using Xunit;

namespace BFMig.Transfer.Tests.Nbd;

/// <summary>The in-flux journal of a disk map, on real files: what survives a kill, a settle, damage and the old marker.</summary>
public sealed class DiskDoubtTests
{
    private const int Block = DiskMapStore.BlockSize;

    private static string NewMapPath(TempDir dir) => Path.Combine(dir.Path, "disk", "vda.map");

    [Fact]
    public void NoJournalMeansNoDoubtAndTheOldMarkerMeansEveryBlock()
    {
        using var dir = TestEnv.CreateTempDir();
        string map = NewMapPath(dir);
        Assert.True(DiskDoubtJournal.Read(map).IsEmpty);
        Assert.False(DiskDoubtJournal.Exists(map));
        DiskBlockMap.MarkInFlux(map);
        Assert.Equal("in flux\n", File.ReadAllText(DiskDoubtJournal.PathOf(map)));
        Assert.True(DiskDoubtJournal.Read(map).Whole);
    }

    [Fact]
    public void AWriteIsJournaledCoarselyBeforeItGoesOutAndExactlyOnceSettled()
    {
        using var dir = TestEnv.CreateTempDir();
        string map = NewMapPath(dir);
        var prior = DiskDoubt.Of([new BlockRange(1000, 2)]);
        using (var journal = DiskDoubtJournal.Begin(map, Block, prior))
        {
            // Durable at once: a helper killed now leaves the earlier doubt.
            Assert.Equal(prior.Ranges, DiskDoubtJournal.Read(map).Ranges);
            journal.Touching(5UL * Block + 100, 10);
            journal.Touching(6UL * Block, (ulong)Block);
            // Killed here (nothing settled): the whole 128-block region is on disk.
            Assert.Equal([new BlockRange(0, DiskDoubtJournal.RegionBlocks), new BlockRange(1000, 2)], DiskDoubtJournal.Read(map).Ranges);
            journal.Settle();
        }
        Assert.Equal([new BlockRange(5, 2), new BlockRange(1000, 2)], DiskDoubtJournal.Read(map).Ranges);

        // The next trip keeps that doubt and adds its own.
        using (var next = DiskDoubtJournal.Begin(map, Block, DiskDoubtJournal.Read(map)))
        {
            next.Touching(7UL * Block, 3UL * Block);
            Assert.Equal([new BlockRange(5, 5), new BlockRange(1000, 2)], next.Doubt.Ranges);
            next.Clear();
        }
        Assert.False(DiskDoubtJournal.Exists(map));
    }

    [Fact]
    public void ADamagedOrTruncatedJournalPutsEveryBlockInDoubt()
    {
        using var dir = TestEnv.CreateTempDir();
        string map = NewMapPath(dir);
        using (var journal = DiskDoubtJournal.Begin(map, Block, DiskDoubt.None))
        {
            journal.Touching(0, 1);
            journal.Touching(300UL * Block, 1);
        }
        byte[] good = File.ReadAllBytes(DiskDoubtJournal.PathOf(map));
        Assert.Equal(2, DiskDoubtJournal.Read(map).Ranges.Count);
        for (int at = 8; at < good.Length; at += 5)
        {
            var bad = (byte[])good.Clone();
            bad[at] ^= 0x10;
            File.WriteAllBytes(DiskDoubtJournal.PathOf(map), bad);
            Assert.True(DiskDoubtJournal.Read(map).Whole, $"byte {at} flipped");
        }
        File.WriteAllBytes(DiskDoubtJournal.PathOf(map), good[..^3]);
        Assert.True(DiskDoubtJournal.Read(map).Whole);
    }

    [Fact]
    public void AWriteNoMapCanDescribeDoubtsEverything()
    {
        using var dir = TestEnv.CreateTempDir();
        string map = NewMapPath(dir);
        using var journal = DiskDoubtJournal.Begin(map, Block, DiskDoubt.None);
        journal.Touching(ulong.MaxValue - 10, 5);
        Assert.True(DiskDoubtJournal.Read(map).Whole);
        Assert.True(journal.Doubt.Whole);
    }

    [Fact]
    public void DoubtAppliedToAMapLeavesTheRestAndUnitesBothHosts()
    {
        var map = new DiskBlockMap(10UL * Block, Block, DiskHashKey.NewRandom());
        for (long b = 0; b < map.BlockCount; b++)
            map.Set(b, (UInt128)(b + 1));
        var sender = DiskDoubt.Of([new BlockRange(2, 2)]);
        var receiver = DiskDoubt.Of([new BlockRange(3, 2), new BlockRange(9, 5)]);
        var view = sender.Union(receiver).Apply(map)!;
        Assert.Equal([new BlockRange(2, 3), new BlockRange(9, 5)], sender.Union(receiver).Ranges);
        Assert.Equal(6, view.KnownCount);
        Assert.False(view.TryGetHash(4, out _));
        Assert.True(view.TryGetHash(5, out var h) && h == 6);
        Assert.Equal(10, map.KnownCount);
        Assert.Null(DiskDoubt.All.Apply(map));
        Assert.True(DiskDoubt.Of(Enumerable.Range(0, DiskDoubt.MaxRanges + 1).Select(i => new BlockRange(2L * i, 1))).Whole);
        Assert.True(DiskDoubt.Decode(receiver.Encode())!.Ranges.SequenceEqual(receiver.Ranges));
        Assert.Null(DiskDoubt.Decode(receiver.Encode()[..^1]));
    }
}
