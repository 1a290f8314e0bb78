using System.Diagnostics;
using BFMig.Transfer.Memory;

namespace BFMig.Benchmarks;

/// <summary>
/// The sender alone, for profilers (<c>perf record</c>): trips alternate between two images that
/// differ in every page, so every trip is "all changed" against a synchronised store (scenario a: "all unchanged").
/// </summary>
internal static class SenderLoop
{
    public static int Run(string scenario, int megabytes, int trips)
    {
        int pages = megabytes * 256;
        var rnd = new Random(7);
        Func<int, int, byte[]> make = scenario switch
        {
            // Every trip after the first is all unchanged (the elision path).
            "a" => (i, _) => Replay.TextPage(new Random(i * 31), i),
            "b" => (i, v) => Replay.RandomPage(new Random((i * 31) + v)),
            "c" => (i, v) => Replay.TextPage(new Random((i * 31) + v), i),
            "c2" => RealPages(pages),
            _ => throw new ArgumentException("scenario a, b, c or c2"),
        };
        var streams = new[] { Replay.StreamOf(Enumerable.Range(0, pages).Select(i => make(i, 1)).ToArray()), Replay.StreamOf(Enumerable.Range(0, pages).Select(i => make(i, 2)).ToArray()) };
        using var dir = new Replay.TempDir();
        using var store = MemoryStore.Open(dir.Path, Guid.NewGuid());
        var sink = new CountingSink();
        // perf record -D -1 --control fifo:CTL,ACK: profile the trips only, not the setup.
        if (Environment.GetEnvironmentVariable("BFMIG_PERF_CTL") is { } ctl) File.WriteAllText(ctl, "enable\n");
        for (int t = 0; t < trips + 1; t++)
        {
            var cpu = BFMig.Native.Linux.ProcessClock.CpuTime;
            var wall = Stopwatch.StartNew();
            Replay.Send(streams[t % 2], store, synced: t > 0, sink);
            store.Commit((ulong)t + 1, "peer", true);
            double w = wall.Elapsed.TotalSeconds;
            double c = (BFMig.Native.Linux.ProcessClock.CpuTime - cpu).TotalSeconds;
            Console.WriteLine($"trip {t}: wall {streams[t % 2].Length / w / 1e6,8:N0} MB/s, per core {streams[t % 2].Length / c / 1e6,8:N0} MB/s");
        }
        return 0;
    }

    /// <summary>Version <c>v</c> (1 or 2) of page <c>i</c>: two disjoint runs of real-file pages.</summary>
    private static Func<int, int, byte[]> RealPages(int pages)
    {
        var real = RealFilePages.Take(0, 2 * pages);
        return (i, v) => real[((v - 1) * pages) + i];
    }

    /// <summary>Counts what is written, keeps nothing (a socket's cost is not the sender's).</summary>
    internal sealed class CountingSink : Stream
    {
        public long Written;
        public override bool CanRead => false;
        public override bool CanSeek => false;
        public override bool CanWrite => true;
        public override long Length => Written;
        public override long Position { get => Written; set => throw new NotSupportedException(); }
        public override void Flush() { }
        public override int Read(byte[] buffer, int offset, int count) => throw new NotSupportedException();
        public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();
        public override void SetLength(long value) => throw new NotSupportedException();
        public override void Write(byte[] buffer, int offset, int count) => Written += count;
        public override void Write(ReadOnlySpan<byte> buffer) => Written += buffer.Length;
        public override ValueTask WriteAsync(ReadOnlyMemory<byte> buffer, CancellationToken ct = default)
        {
            Written += buffer.Length;
            return ValueTask.CompletedTask;
        }
    }
}
