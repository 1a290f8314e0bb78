using System.Diagnostics;
using BFMig.Native.Compression;
using BFMig.Transfer.Memory;

namespace BFMig.Benchmarks;

/// <summary>Times the pieces of the sender's changed-page path separately (to see where time goes).</summary>
internal static class Micro
{
    public static int Run()
    {
        const int Pages = 32768;
        var data = new byte[Pages * 4096L];
        new Random(1).NextBytes(data);
        var dir = Path.Combine(Path.GetTempPath(), "bfmig-micro-" + Guid.NewGuid().ToString("N")[..8]);
        using (var s = MemoryStore.Open(dir, Guid.NewGuid()))
        {
            s.BeginTrip([new RamBlockInfo("pc.ram", Pages * 4096L)], s.State.Seed, false, true);
            var sw = Stopwatch.StartNew();
            for (int p = 0; p < Pages; p++) s.Put(0, p, data.AsSpan(p * 4096, 4096), s.Hash(data.AsSpan(p * 4096, 4096)));
            Report("store.Put+hash (fresh pages)", sw.Elapsed, data.Length);
            sw.Restart();
            for (int p = 0; p < Pages; p++) { var pg = data.AsSpan(((p + 7) % Pages) * 4096, 4096); s.Put(0, p, pg, s.Hash(pg)); }
            Report("store.Put+hash (rewrite)", sw.Elapsed, data.Length);
            sw.Restart();
            for (int p = 0; p < Pages; p++) s.TryLocate(s.Hash(data.AsSpan(p * 4096, 4096)) + 1, out _, out _);
            Report("hash+TryLocate miss", sw.Elapsed, data.Length);
            var dst = new byte[4096];
            sw.Restart();
            for (int p = 0; p < Pages; p++) PageDelta.Encode(s.Page(0, p), data.AsSpan(p * 4096, 4096), dst, 2048);
            Report("PageDelta.Encode (random)", sw.Elapsed, data.Length);
        }
        Directory.Delete(dir, true);
        using var z = new ZstdCodec(1);
        var outb = new byte[ZstdCodec.CompressBound(256 << 10)];
        var text = Replay.StreamOf(Enumerable.Range(0, 8192).Select(i => System.Text.Encoding.ASCII.GetBytes(string.Concat(Enumerable.Repeat($"word{i % 97} ", 800)))[..4096]).ToArray());
        var sw2 = Stopwatch.StartNew();
        for (int i = 0; i + (256 << 10) <= data.Length; i += 256 << 10) z.Compress(data.AsSpan(i, 256 << 10), outb);
        Report("zstd-1 random", sw2.Elapsed, data.Length);
        sw2.Restart();
        for (int i = 0; i + (256 << 10) <= text.Length; i += 256 << 10) z.Compress(text.AsSpan(i, 256 << 10), outb);
        Report("zstd-1 text", sw2.Elapsed, text.Length);
        return 0;
    }

    private static void Report(string what, TimeSpan t, long bytes) => Console.WriteLine($"{what,-32} {bytes / t.TotalSeconds / 1e6,10:N0} MB/s");
}
