using System.Runtime.InteropServices;
using BFMig.Transfer.Memory;
using BFMig.Transfer.Wire;

namespace BFMig.Transfer.Tests;

/// <summary>The sender's throughput machinery: frame pipeline, page locator, delta pre-check.</summary>
public class PipelineTests
{
    private static byte[] Payload(int i)
    {
        // Alternate incompressible, compressible, tiny and large-uncompressible payloads.
        var rnd = new Random(i);
        int len = (i % 4) switch { 0 => 300_000, 1 => 200_000, 2 => 17, _ => 1 << 20 };
        var p = new byte[len];
        if (i % 4 == 1) System.Text.Encoding.ASCII.GetBytes(string.Concat(Enumerable.Range(0, len / 2).Select(k => $"w{rnd.Next(40)} ")))[..len].CopyTo(p, 0);
        else rnd.NextBytes(p);
        return p;
    }

    [Theory]
    [InlineData(CompressionMode.Zstd)]
    [InlineData(CompressionMode.Auto)]
    [InlineData(CompressionMode.None)]
    public async Task Frames_leave_the_pipeline_whole_and_in_order(CompressionMode mode)
    {
        var ms = new MemoryStream();
        using var w = new FrameWriter(ms, mode);
        var sent = new List<byte[]>();
        await using (var pipe = new FramePipeline(w))
        {
            for (int i = 0; i < 24; i++)
            {
                var p = Payload(i);
                var slot = await pipe.RentAsync(default);
                p.CopyTo(slot.Payload, 0);
                pipe.Post(slot, FrameType.MigData, p.Length, compress: true);
                sent.Add(p);
                if (i == 10) await pipe.FlushAsync(default);
            }
            await pipe.FlushAsync(default);
            Assert.Equal(24, pipe.FramesWritten);
        }
        if (mode == CompressionMode.Zstd) Assert.True(w.BytesWritten < w.PayloadBytes, $"{w.BytesWritten} of {w.PayloadBytes}");
        ms.Position = 0;
        using var r = new FrameReader(ms, TimeSpan.FromSeconds(5));
        foreach (var p in sent)
        {
            var f = await r.ReadAsync(default);
            Assert.Equal(FrameType.MigData, f!.Value.Type);
            Assert.Equal(p, f.Value.Payload.ToArray());
        }
        Assert.Null(await r.ReadAsync(default));
    }

    [Fact]
    public async Task A_stalled_peer_stops_the_producer_after_depth_buffers()
    {
        var gate = new GateStream();
        using var w = new FrameWriter(gate, CompressionMode.Zstd);
        await using var pipe = new FramePipeline(w, depth: 3);
        var buffers = new HashSet<byte[]>(ReferenceEqualityComparer.Instance);
        // The producer keeps one buffer to fill; the others are posted and the peer takes nothing.
        var current = await pipe.RentAsync(default);
        buffers.Add(current.Payload);
        int posted = 0;
        Task<FramePipeline.Slot>? blocked = null;
        for (int i = 0; i < 10; i++)
        {
            var next = pipe.RentAsync(default).AsTask();
            if (!await Completes(next, TimeSpan.FromMilliseconds(500)))
            {
                blocked = next;
                break;
            }
            var rented = await next;
            buffers.Add(rented.Payload);
            Payload(i).AsSpan(0, 1000).CopyTo(current.Payload);
            pipe.Post(current, FrameType.MigData, 1000, compress: true);
            posted++;
            current = rented;
        }
        Assert.NotNull(blocked);
        Assert.Equal(3, buffers.Count);
        // One frame may be inside the (blocked) write, the rest wait in the queue: no more than depth.
        Assert.InRange(posted, 2, 3);
        gate.Open();
        Assert.True(await Completes(blocked!, TimeSpan.FromSeconds(10)), "producer still blocked after the peer drained");
        Assert.Contains((await blocked!).Payload, buffers);
        pipe.Return(current);
        await pipe.FlushAsync(default);
        Assert.Equal(posted, pipe.FramesWritten);
    }

    [Fact]
    public async Task A_failed_peer_write_fails_the_producer_with_that_error()
    {
        using var w = new FrameWriter(new FailingStream(), CompressionMode.None);
        await using var pipe = new FramePipeline(w);
        var slot = await pipe.RentAsync(default);
        pipe.Post(slot, FrameType.MigData, 100, compress: false);
        var e = await Assert.ThrowsAsync<IOException>(() => pipe.FlushAsync(default));
        Assert.Contains("peer gone", e.Message);
        await Assert.ThrowsAsync<IOException>(async () => await pipe.RentAsync(default));
    }

    private static async Task<bool> Completes(Task t, TimeSpan within) => await Task.WhenAny(t, Task.Delay(within)) == t;

    [Fact]
    public void Locator_finds_current_pages_and_never_returns_a_rewritten_one()
    {
        using var dir = new TempDir();
        using var s = MemoryStore.Open(dir.Path, Guid.NewGuid());
        const int Pages = 4096;
        s.BeginTrip([new RamBlockInfo("pc.ram", Pages * 4096L), new RamBlockInfo("vga", 16 * 4096L)], s.State.Seed, keep: false, buildLocator: true);
        var page = new byte[4096];
        var hashes = new UInt128[Pages];
        for (int p = 0; p < Pages; p++)
        {
            BitConverter.TryWriteBytes(page, p);
            hashes[p] = s.Hash(page);
            s.Put(0, p, page, hashes[p]);
        }
        int found = 0;
        for (int p = 0; p < Pages; p++)
        {
            if (!s.TryLocate(hashes[p], out int b, out long at)) continue;
            found++;
            Assert.Equal((0, (long)p), (b, at));
        }
        // Twice as many slots as pages in 4-way buckets: losing any is rare.
        Assert.True(found > Pages * 99 / 100, $"found {found} of {Pages}");
        // Rewrite every even page: their old content is gone, so the locator must not offer it.
        for (int p = 0; p < Pages; p += 2)
        {
            BitConverter.TryWriteBytes(page, p + 1_000_000);
            s.Put(0, p, page, s.Hash(page));
        }
        for (int p = 0; p < Pages; p += 2) Assert.False(s.TryLocate(hashes[p], out _, out _));
        // A page copied to the second block is found there (newest first), and stays correct.
        BitConverter.TryWriteBytes(page, 3);
        s.Put(1, 5, page, hashes[3]);
        Assert.True(s.TryLocate(hashes[3], out int blk, out long pg));
        Assert.Equal(hashes[3], s.GetHash(blk, pg));
    }

    [Fact]
    public void Locator_under_overload_is_lossy_but_never_wrong()
    {
        var locator = new PageLocator(64);
        var truth = new Dictionary<(int, long), UInt128>();
        var rnd = new Random(3);
        var check = new TruthCheck(truth);
        for (int i = 0; i < 20_000; i++)
        {
            var h = new UInt128((ulong)rnd.NextInt64(), (ulong)rnd.NextInt64());
            int b = rnd.Next(3);
            long p = rnd.Next(200);
            truth[(b, p)] = h;
            locator.Insert(h, b, p);
            check.Want = h;
            Assert.True(locator.TryFind(h, ref check, out int fb, out long fp), "the newest entry of a bucket is always there");
            Assert.Equal((b, p), (fb, fp));
        }
        int hits = 0;
        foreach (var ((b, p), h) in truth)
        {
            check.Want = h;
            if (!locator.TryFind(h, ref check, out int fb, out long fp)) continue;
            hits++;
            Assert.Equal(h, truth[(fb, fp)]);
        }
        Assert.True(hits > 0);
        Assert.Equal(1024, locator.Capacity);
    }

    private struct TruthCheck(Dictionary<(int, long), UInt128> truth) : PageLocator.ICandidateCheck
    {
        public UInt128 Want;
        public readonly bool Holds(int block, long page) => truth.TryGetValue((block, page), out var h) && h == Want;
    }

    [Fact]
    public void Delta_precheck_agrees_with_a_word_count()
    {
        var rnd = new Random(9);
        var a = new byte[4096];
        for (int round = 0; round < 400; round++)
        {
            rnd.NextBytes(a);
            var b = (byte[])a.Clone();
            int changes = rnd.Next(0, 520);
            for (int k = 0; k < changes; k++) b[rnd.Next(4096)] ^= (byte)(1 + rnd.Next(255));
            var wa = MemoryMarshal.Cast<byte, ulong>(a);
            var wb = MemoryMarshal.Cast<byte, ulong>(b);
            int differ = 0;
            for (int i = 0; i < 512; i++) differ += wa[i] != wb[i] ? 1 : 0;
            int max = rnd.Next(0, 300);
            Assert.Equal(differ > max, PageDelta.ChangedWordsExceed(wa, wb, max));
            var dst = new byte[4096];
            int n = PageDelta.Encode(a, b, dst, 2048);
            if (differ * 8 > 2048) Assert.Equal(-1, n);
            if (n > 0)
            {
                var rebuilt = (byte[])a.Clone();
                Assert.True(PageDelta.TryApply(dst.AsSpan(0, n), rebuilt));
                Assert.Equal(b, rebuilt);
            }
        }
    }

    /// <summary>A peer that takes nothing until opened.</summary>
    private sealed class GateStream : Stream
    {
        private readonly TaskCompletionSource _open = new(TaskCreationOptions.RunContinuationsAsynchronously);
        public void Open() => _open.TrySetResult();
        public override async ValueTask WriteAsync(ReadOnlyMemory<byte> buffer, CancellationToken ct = default) => await _open.Task.WaitAsync(ct);
        public override Task FlushAsync(CancellationToken ct) => _open.Task.WaitAsync(ct);
        public override bool CanRead => false;
        public override bool CanSeek => false;
        public override bool CanWrite => true;
        public override long Length => throw new NotSupportedException();
        public override long Position { get => throw new NotSupportedException(); set => throw new NotSupportedException(); }
        public override void Flush() { }
        public override int Read(byte[] buffer, int offset, int count) => throw new NotSupportedException();
        public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();
        public override void SetLength(long value) => throw new NotSupportedException();
        public override void Write(byte[] buffer, int offset, int count) => throw new NotSupportedException();
    }

    private sealed class FailingStream : Stream
    {
        public override ValueTask WriteAsync(ReadOnlyMemory<byte> buffer, CancellationToken ct = default) => ValueTask.FromException(new IOException("peer gone"));
        public override bool CanRead => false;
        public override bool CanSeek => false;
        public override bool CanWrite => true;
        public override long Length => throw new NotSupportedException();
        public override long Position { get => throw new NotSupportedException(); set => throw new NotSupportedException(); }
        public override void Flush() { }
        public override int Read(byte[] buffer, int offset, int count) => throw new NotSupportedException();
        public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();
        public override void SetLength(long value) => throw new NotSupportedException();
        public override void Write(byte[] buffer, int offset, int count) => throw new NotSupportedException();
    }
}
