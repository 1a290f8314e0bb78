using System.Buffers.Binary;
using System.Diagnostics;
using System.Text;
using BFMig.Native.Compression;
using BFMig.Transfer.Disk;
using BFMig.Transfer.Memory;
using BFMig.Transfer.Wire;
using BFMig.Transfer;

namespace BFMig.Benchmarks;

/// <summary>
/// Replays synthetic QEMU streams through the sender and receiver cores (zstd frames as on the
/// wire) and prints throughput next to a plain memcpy of the same bytes, plus wire sizes against
/// the ideal. The sender parses, hashes and records on its thread while a
/// <see cref="FramePipeline"/> compresses and writes frames on others, so it gets two figures:
/// wall (bytes / elapsed time) and per core (bytes / CPU time of the whole process, all threads,
/// while it ran). The receiver is one thread.
/// </summary>
internal static class Replay
{
    public static int Run(int megabytes)
    {
        int pages = megabytes * 256;
        // Warm-up (not printed): the first call of each path pays for its JIT compilation (the shipped helper is AOT-compiled).
        Quiet(() => Scenarios(8));
        Console.WriteLine($"replay: {megabytes} MiB guest ({pages} pages), zstd level 1 frames, load average {File.ReadAllText("/proc/loadavg").Split(' ')[0]}"
            + $" on {Environment.ProcessorCount} cores");
        Console.WriteLine($"{"",-34} {"sender wall",20} {"sender per core",20} {"receiver (1 thread)",20}");
        Console.WriteLine($"{"scenario",-34} {"MB/s",10} {"x memcpy",9} {"MB/s",10} {"x memcpy",9} {"MB/s",10} {"x memcpy",9} {"wire/stream",12}");
        return Scenarios(megabytes);
    }

    private static void Quiet(Action a)
    {
        var o = Console.Out;
        Console.SetOut(TextWriter.Null);
        try
        {
            a();
        }
        finally
        {
            Console.SetOut(o);
        }
    }

    private static int Scenarios(int megabytes)
    {
        int pages = megabytes * 256;
        var rnd = new Random(42);
        var baseImage = Enumerable.Range(0, pages).Select(i => TextPage(rnd, i)).ToArray();

        Scenario("a) all unchanged", baseImage, (_, old) => old, pages);
        Scenario("b) all changed, incompressible", baseImage, (i, _) => RandomPage(new Random(i + 1000)), pages);
        Scenario("b') b with PSK frame sealing", baseImage, (i, _) => RandomPage(new Random(i + 1000)), pages, sealFrames: true);
        var textNew = Enumerable.Range(0, pages).Select(i => TextPage(new Random(i + 5000), i)).ToArray();
        var c = Scenario("c) all changed, compressible", baseImage, (i, _) => textNew[i], pages);
        // The same trip with pages of real files (shared libraries and Python sources: what a guest's
        // page cache holds) instead of the synthetic word salad, which is zstd's slow case.
        var realBase = RealFilePages.Take(0, pages);
        var realNew = RealFilePages.Take(pages, pages);
        var c2 = Scenario("c2) all changed, real files", realBase, (i, _) => realNew[i], pages);
        var tenth = Scenario("d) 10% changed (compressible)", baseImage, (i, old) => i % 10 == 3 ? TextPage(new Random(i + 9000), i) : old, pages);
        Scenario("d') d with PSK frame sealing", baseImage, (i, old) => i % 10 == 3 ? TextPage(new Random(i + 9000), i) : old, pages, sealFrames: true);

        // Ideal for (d): only the changed pages, compressed with zstd alone, in frames of the same size.
        var changed = baseImage.Select((p, i) => i % 10 == 3 ? TextPage(new Random(i + 9000), i) : null).Where(p => p is not null).ToArray();
        long ideal = ZstdChunks(changed!);
        var plainStream = StreamOf(baseImage.Select((p, i) => i % 10 == 3 ? TextPage(new Random(i + 9000), i) : p).ToArray());
        long plainZstd = ZstdChunks(Chunk(plainStream));
        Console.WriteLine();
        // The ceiling for (c): libzstd itself, one thread, on just the changed pages, level 1 as the frames use.
        double zc = ZstdAlonePerCore(textNew);
        double zc2 = ZstdAlonePerCore(realNew);
        Console.WriteLine($"zstd level 1 alone (one thread, CPU time, 256 KiB blocks) on the changed pages: c) {zc:N0} MB/s, c2) {zc2:N0} MB/s;"
            + $" sender per core is {c.SenderPerCoreMBs / zc:0.00} x / {c2.SenderPerCoreMBs / zc2:0.00} x of it");
        var (seal, open, diskHash) = CryptoPerCore();
        Console.WriteLine($"PSK frame sealing alone (AES-256-GCM, one thread, CPU time, 1 MiB frames): seal {seal:N0} MB/s, open {open:N0} MB/s;"
            + $" disk block identity (HMAC-SHA256, 64 KiB blocks): {diskHash:N0} MB/s");
        Console.WriteLine($"10% changed: wire {tenth.Wire:N0} B, ideal (changed pages, zstd alone) {ideal:N0} B -> {(double)tenth.Wire / ideal:0.000} x ideal (target <= 1.10)");
        Console.WriteLine($"             stream carried plainly {plainStream.Length:N0} B -> wire is {100.0 * tenth.Wire / plainStream.Length:0.0}% of it (target <= 12%);"
            + $" plain+zstd {plainZstd:N0} B -> {100.0 * tenth.Wire / plainZstd:0.0}%");
        return 0;
    }

    private sealed record Result(double SenderMBs, double SenderPerCoreMBs, double ReceiverMBs, long Wire);

    private static TimeSpan Cpu() => BFMig.Native.Linux.ProcessClock.CpuTime;

    private static Result Scenario(string name, byte[][] baseImage, Func<int, byte[], byte[]> change, int pages, bool sealFrames = false)
    {
        using var dirA = new TempDir();
        using var dirB = new TempDir();
        var guest = Guid.NewGuid();
        using var a = MemoryStore.Open(dirA.Path, guest);
        using var b = MemoryStore.Open(dirB.Path, guest);
        var first = StreamOf(baseImage);
        Trip(first, a, b, out _, out _, out _, out _);
        var now = baseImage.Select((p, i) => change(i, p)).ToArray();
        var second = StreamOf(now);
        Trip(second, b, a, out var sendTime, out var sendCpu, out var recvTime, out long wire, sealFrames ? FrameKeys.Derive(RandomNumberGeneratorBytes(32), "bench"u8).SenderToReceiver : null);
        double memcpy = Memcpy(second);
        double sMBs = second.Length / sendTime.TotalSeconds / 1e6;
        double cMBs = second.Length / sendCpu.TotalSeconds / 1e6;
        double rMBs = second.Length / recvTime.TotalSeconds / 1e6;
        Console.WriteLine($"{name,-34} {sMBs,10:N0} {sMBs / memcpy,9:0.000} {cMBs,10:N0} {cMBs / memcpy,9:0.000} {rMBs,10:N0} {rMBs / memcpy,9:0.000} {(double)wire / second.Length,12:0.0000}");
        return new Result(sMBs, cMBs, rMBs, wire);
    }

    /// <summary>Sender then receiver over in-memory frames; times each side alone.</summary>
    private static void Trip(byte[] stream, MemoryStore sender, MemoryStore receiver, out TimeSpan sendTime, out TimeSpan sendCpu, out TimeSpan recvTime, out long wire,
        byte[]? frameKey = null)
    {
        bool synced = sender.State.Generation != 0 && sender.State.Digest == receiver.State.Digest;
        // Sized up front: growing it would charge the sender for the benchmark's own copies.
        var wireStream = new MemoryStream(stream.Length + (stream.Length / 8) + (1 << 20));
        // Touched before the clock starts: a fresh array's first write faults in and clears each of
        // its pages, which charged the sender about half its CPU time on the all-changed cases.
        wireStream.GetBuffer().AsSpan().Clear();
        var cpu = Cpu();
        var sw = Stopwatch.StartNew();
        wire = Send(stream, sender, synced, wireStream, frameKey);
        sendTime = sw.Elapsed;
        sendCpu = Cpu() - cpu;

        wireStream.Position = 0;
        var dec = new MigDecoder(receiver, synced, sender.State.Seed, new TransferStats());
        using var reader = new FrameReader(wireStream, TimeSpan.FromMinutes(1));
        if (frameKey is not null) reader.Protect(new FrameSealer(frameKey));
        long produced = 0;
        sw.Restart();
        while (reader.ReadAsync(default).AsTask().GetAwaiter().GetResult() is { } f)
        {
            dec.BeginFrame();
            int p = 0;
            do
            {
                p = dec.Process(f.Payload.Span, p);
                produced += dec.Output.Length;
                dec.ResetOutput();
            }
            while (p < f.Payload.Length || dec.HasPendingOutput);
        }
        recvTime = sw.Elapsed;
        if (produced != stream.Length) throw new InvalidOperationException($"receiver rebuilt {produced} bytes of {stream.Length}");
        ulong gen = Math.Max(sender.State.Generation, receiver.State.Generation) + 1;
        if (sender.ComputeDigest() != receiver.ComputeDigest()) throw new InvalidOperationException("stores disagree after replay");
        receiver.Commit(gen, "s", true);
        sender.Commit(gen, "r", true);
    }

    /// <summary>Runs the sender core over <paramref name="stream"/>, framing to <paramref name="wireStream"/>; returns the wire bytes.</summary>
    internal static long Send(byte[] stream, MemoryStore sender, bool synced, Stream wireStream, byte[]? frameKey = null)
    {
        using var writer = new FrameWriter(wireStream, CompressionMode.Zstd);
        if (frameKey is not null) writer.Protect(new FrameSealer(frameKey));
        var frames = new FramePipeline(writer);
        var current = frames.RentAsync(default).AsTask().GetAwaiter().GetResult();
        var enc = new MigEncoder(sender, synced, sender.State.Seed, new TransferStats(), current.Payload);
        int pos = 0;
        const int Chunk = 256 << 10;
        while (true)
        {
            int end = Math.Min(stream.Length, pos + Chunk);
            pos += enc.Consume(stream.AsSpan(pos, end - pos), end == stream.Length);
            if (enc.OpsLength >= MigEncoder.FlushThreshold || pos == stream.Length)
            {
                enc.CompleteOps();
                if (enc.OpsLength > 0)
                {
                    // As MigSender does: the full buffer is compressed and written on the pool while encoding goes on.
                    var next = frames.RentAsync(default).AsTask().GetAwaiter().GetResult();
                    int length = enc.OpsLength;
                    enc.SwapOps(next.Payload);
                    frames.Post(current, FrameType.MigData, length, compress: true);
                    current = next;
                }
                if (pos == stream.Length) break;
            }
        }
        frames.FlushAsync(default).GetAwaiter().GetResult();
        frames.DisposeAsync().AsTask().GetAwaiter().GetResult();
        return writer.BytesWritten;
    }

    private static double Memcpy(byte[] stream)
    {
        var dst = new byte[1 << 20];
        var sw = Stopwatch.StartNew();
        for (int rep = 0; rep < 3; rep++)
            for (int i = 0; i < stream.Length; i += dst.Length)
                stream.AsSpan(i, Math.Min(dst.Length, stream.Length - i)).CopyTo(dst);
        return stream.Length * 3 / sw.Elapsed.TotalSeconds / 1e6;
    }

    /// <summary>MB/s of CPU time that zstd level 1 needs for <paramref name="pages"/> in 256 KiB blocks (median of three).</summary>
    private static double ZstdAlonePerCore(IEnumerable<byte[]> pages)
    {
        byte[] all = pages.SelectMany(p => p).ToArray();
        using var z = new ZstdCodec(1);
        var dst = new byte[ZstdCodec.CompressBound(256 << 10)];
        var runs = new double[3];
        for (int run = 0; run < runs.Length; run++)
        {
            var cpu = Cpu();
            for (int at = 0; at < all.Length; at += 256 << 10)
                z.Compress(all.AsSpan(at, Math.Min(256 << 10, all.Length - at)), dst);
            runs[run] = all.Length / (Cpu() - cpu).TotalSeconds / 1e6;
        }
        Array.Sort(runs);
        return runs[1];
    }

    private static byte[] RandomNumberGeneratorBytes(int n) => System.Security.Cryptography.RandomNumberGenerator.GetBytes(n);

    /// <summary>MB/s of CPU time for sealing and opening 1 MiB frames and for the disk block hash (median of three).</summary>
    private static (double Seal, double Open, double DiskHash) CryptoPerCore()
    {
        var frame = new byte[1 << 20];
        new Random(1).NextBytes(frame);
        var header = new byte[FrameCodec.HeaderLength];
        var tag = new byte[FrameSealer.TagLength];
        var key = RandomNumberGeneratorBytes(32);
        var diskKey = DiskHashKey.NewRandom();
        const int Rounds = 256;
        double Median(Action run)
        {
            var runs = new double[3];
            for (int r = 0; r < runs.Length; r++)
            {
                var cpu = Cpu();
                run();
                runs[r] = (double)Rounds * frame.Length / (Cpu() - cpu).TotalSeconds / 1e6;
            }
            Array.Sort(runs);
            return runs[1];
        }
        double seal = Median(() =>
        {
            using var s = new FrameSealer(key);
            for (int i = 0; i < Rounds; i++) s.Seal(header, frame, frame, tag);
        });
        double open = Median(() =>
        {
            // Opening fails on these bytes (they were never sealed under this sequence), after the same work as a success.
            using var s = new FrameSealer(key);
            for (int i = 0; i < Rounds; i++) s.TryOpen(header, frame, tag);
        });
        double disk = Median(() =>
        {
            for (int i = 0; i < Rounds; i++)
                for (int at = 0; at < frame.Length; at += 64 << 10) DiskBlockHash.Compute(frame.AsSpan(at, 64 << 10), diskKey);
        });
        return (seal, open, disk);
    }

    private static long ZstdChunks(IEnumerable<byte[]> pagesOrChunks)
    {
        using var z = new ZstdCodec(1);
        var buf = new List<byte>();
        long total = 0;
        var dst = new byte[ZstdCodec.CompressBound(1 << 20)];
        var chunk = new MemoryStream();
        foreach (var p in pagesOrChunks)
        {
            chunk.Write(p);
            if (chunk.Length >= 256 << 10)
            {
                total += z.Compress(chunk.ToArray(), dst);
                chunk.SetLength(0);
            }
        }
        if (chunk.Length > 0) total += z.Compress(chunk.ToArray(), dst);
        return total;
    }

    private static IEnumerable<byte[]> Chunk(byte[] s)
    {
        for (int i = 0; i < s.Length; i += 256 << 10) yield return s[i..Math.Min(s.Length, i + (256 << 10))];
    }

    private static readonly string[] Words = "the of and to in is was for on that with as by at from guest page memory host kernel buffer cache disk migrate qemu block 0x7f3a2c 4096 struct task_struct inode dentry".Split(' ');

    internal static byte[] TextPage(Random r, int i)
    {
        var sb = new StringBuilder(4200);
        sb.Append(i).Append(':');
        while (sb.Length < 4096) sb.Append(Words[r.Next(Words.Length)]).Append(r.Next(3) == 0 ? ' ' : '_').Append(r.Next(1000));
        return Encoding.ASCII.GetBytes(sb.ToString(0, 4096));
    }

    internal static byte[] RandomPage(Random r)
    {
        var p = new byte[4096];
        r.NextBytes(p);
        return p;
    }

    /// <summary>A QEMU 7.2-style stream: one ram block, every page as a PAGE record, device state at the end.</summary>
    internal static byte[] StreamOf(byte[][] pages)
    {
        var ms = new MemoryStream(pages.Length * 4104 + 1024);
        WriteStream(ms, pages.Length, (i, into) => pages[i].CopyTo(into));
        return ms.ToArray();
    }

    /// <summary>Writes page <paramref name="index"/> (4096 bytes) into <paramref name="into"/>.</summary>
    internal delegate void PageSource(long index, Span<byte> into);

    /// <summary>The stream of <see cref="StreamOf"/> for <paramref name="pages"/> pages made on demand, written to <paramref name="output"/>.</summary>
    internal static void WriteStream(Stream output, long pages, PageSource page)
    {
        var b8 = new byte[8];
        void Be32(uint v) { BinaryPrimitives.WriteUInt32BigEndian(b8, v); output.Write(b8, 0, 4); }
        void Be64(ulong v) { BinaryPrimitives.WriteUInt64BigEndian(b8, v); output.Write(b8); }
        Be32(QemuFormat.FileMagic); Be32(3); output.WriteByte(7); Be32(2); output.Write("pc"u8);
        output.WriteByte(1); Be32(2); output.WriteByte(3); output.Write("ram"u8); Be32(0); Be32(4);
        Be64(((ulong)pages << 12) | QemuFormat.FlagMemSize); output.WriteByte(6); output.Write("pc.ram"u8); Be64((ulong)pages << 12);
        Be64(QemuFormat.FlagEos); output.WriteByte(0x7e); Be32(2);
        output.WriteByte(3); Be32(2);
        var content = new byte[4096];
        for (long i = 0; i < pages; i++)
        {
            Be64(((ulong)i << 12) | QemuFormat.FlagPage | (i > 0 ? QemuFormat.FlagContinue : 0));
            if (i == 0) { output.WriteByte(6); output.Write("pc.ram"u8); }
            page(i, content);
            output.Write(content);
        }
        Be64(QemuFormat.FlagEos); output.WriteByte(0x7e); Be32(2);
        output.WriteByte(4); Be32(3); output.WriteByte(5); output.Write("timer"u8); Be32(0); Be32(2); output.Write(new byte[64]); output.WriteByte(0);
    }

    internal sealed class TempDir : IDisposable
    {
        public TempDir() => Directory.CreateDirectory(Path);
        public string Path { get; } = System.IO.Path.Combine(System.IO.Path.GetTempPath(), "bfmig-bench-" + Guid.NewGuid().ToString("N")[..12]);
        public void Dispose() => Directory.Delete(Path, recursive: true);
    }
}
