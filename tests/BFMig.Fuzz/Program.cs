using System.Diagnostics;
using BFMig.Native.Compression;
using BFMig.Transfer.Memory;
using BFMig.Transfer.Wire;
using BFMig.Transfer;

namespace BFMig.Fuzz;

/// <summary>
/// Random mutation of real inputs for a time budget. A target fails (exit 1, input saved) when the
/// code under test throws anything but its documented "stream unusable" error, loses bytes, or
/// produces an oversized segment.
/// </summary>
internal static class Program
{
    private static readonly string[] Targets = ["qemu", "frames", "sealed", "ops", "nbd", "hello", "config", "xml", "multifd", "multifd-ops", "page-index"];

    private static int Main(string[] args)
    {
        if (args is ["corpus", var name, var dir] && Targets.Contains(name))
            return WriteCorpus(name, dir);
        if (args is ["afl", var aflTarget] && Targets.Contains(aflTarget))
            return RunUnderAfl(aflTarget);
        if (args is ["run", var runTarget, var file] && Targets.Contains(runTarget))
        {
            // Replays one saved input (an afl++ crash) with the same deterministic Random as under afl.
            Target(runTarget)(File.ReadAllBytes(file), new Random(0));
            Console.WriteLine($"{runTarget}: {file} passes");
            return 0;
        }
        if (args.Length < 1 || !Targets.Contains(args[0]))
        {
            Console.Error.WriteLine("usage: BFMig.Fuzz qemu|frames|sealed|ops|nbd|hello|config|xml|multifd|multifd-ops|page-index [SECONDS] [SEED] | corpus TARGET DIR | afl TARGET | run TARGET FILE");
            return 2;
        }
        double seconds = args.Length > 1 ? double.Parse(args[1], System.Globalization.CultureInfo.InvariantCulture) : 30;
        int seed = args.Length > 2 ? int.Parse(args[2], System.Globalization.CultureInfo.InvariantCulture) : Environment.TickCount;
        var rnd = new Random(seed);
        var corpus = Corpus(args[0]);
        var target = Target(args[0]);
        var clock = Stopwatch.StartNew();
        long runs = 0;
        while (clock.Elapsed.TotalSeconds < seconds)
        {
            var input = Mutate(corpus[rnd.Next(corpus.Count)], rnd);
            try
            {
                target(input, rnd);
            }
            catch (Exception e)
            {
                string path = Path.Combine(Path.GetTempPath(), $"bfmig-fuzz-{args[0]}-{seed}-{runs}.bin");
                File.WriteAllBytes(path, input);
                Console.Error.WriteLine($"FAIL {args[0]} seed {seed} run {runs}: {e.GetType().Name}: {e.Message} (input saved to {path})");
                Console.Error.WriteLine(e.StackTrace);
                return 1;
            }
            runs++;
        }
        _opsStore?.Dispose();
        if (Directory.Exists(StoreRoot)) Directory.Delete(StoreRoot, recursive: true);
        HelloTarget.Close();
        ConfigTarget.Close();
        XmlTarget.Close();
        Console.WriteLine($"{args[0]}: {runs} inputs in {clock.Elapsed.TotalSeconds:0.0} s, seed {seed}, no failure");
        return 0;
    }

    private static List<byte[]> Corpus(string target) => target switch
    {
        "qemu" => LoadFixtures(),
        "frames" => FrameCorpus(),
        "sealed" => SealedCorpus(),
        "nbd" => NbdTarget.Corpus(),
        "hello" => HelloTarget.Corpus(),
        "config" => ConfigTarget.Corpus(),
        "xml" => XmlTarget.Corpus(),
        "multifd" => MultifdTarget.Corpus(),
        "multifd-ops" => MultifdTarget.OpsCorpus(),
        "page-index" => PageIndexTarget.Corpus(),
        _ => OpsCorpus(),
    };

    private static Action<byte[], Random> Target(string target) => target switch
    {
        "qemu" => FuzzQemu,
        "frames" => FuzzFrames,
        "sealed" => FuzzSealed,
        "nbd" => NbdTarget.Run,
        "hello" => HelloTarget.Run,
        "config" => ConfigTarget.Run,
        "xml" => XmlTarget.Run,
        "multifd" => MultifdTarget.Run,
        "multifd-ops" => MultifdTarget.RunOps,
        "page-index" => PageIndexTarget.Run,
        _ => FuzzOps,
    };

    // Seeds for afl++: the same real inputs the mutation runs start from, cut to afl's liking (it
    // works best on small files; the QEMU captures' heads and tails keep their structure).
    private static int WriteCorpus(string target, string dir)
    {
        Directory.CreateDirectory(dir);
        int i = 0;
        foreach (var input in Corpus(target))
            File.WriteAllBytes(Path.Combine(dir, $"{target}-{i++}.bin"), input.Length > 64_000 ? input[..64_000] : input);
        Console.WriteLine($"{target}: {i} seed inputs in {dir}");
        return 0;
    }

    // One input per afl++ execution (read from stdin), in a SharpFuzz-instrumented BFMig.Transfer:
    // anything but the documented "stream unusable" error escapes as a crash that afl++ saves.
    private static int RunUnderAfl(string target)
    {
        var run = Target(target);
        SharpFuzz.Fuzzer.OutOfProcess.Run(stream =>
        {
            using var ms = new MemoryStream();
            stream.CopyTo(ms);
            run(ms.ToArray(), new Random(0));
        });
        return 0;
    }

    private static List<byte[]> LoadFixtures()
    {
        var list = new List<byte[]>();
        using var z = new ZstdCodec();
        var buffer = new byte[32 << 20];
        foreach (var f in Directory.GetFiles(Path.Combine(AppContext.BaseDirectory, "Fixtures"), "*.zst"))
        {
            int n = z.Decompress(File.ReadAllBytes(f), buffer);
            // Keep inputs small so each run is quick: the head (header, block list, first pages) and a tail.
            list.Add(buffer[..Math.Min(n, 300_000)]);
            list.Add(buffer[Math.Max(0, n - 200_000)..n]);
        }
        return list;
    }

    private static byte[] Mutate(byte[] source, Random r)
    {
        var b = new List<byte>(source.Length > 400_000 ? source[..400_000] : source);
        int edits = 1 + r.Next(8);
        for (int i = 0; i < edits && b.Count > 0; i++)
        {
            int at = r.Next(b.Count);
            switch (r.Next(6))
            {
                case 0: b[at] ^= (byte)(1 << r.Next(8)); break;
                case 1: b[at] = (byte)r.Next(256); break;
                case 2: b.Insert(at, (byte)r.Next(256)); break;
                case 3: b.RemoveRange(at, Math.Min(b.Count - at, 1 + r.Next(16))); break;
                case 4: b.RemoveRange(at, b.Count - at); break;
                default:
                    for (int k = 0; k < 4 && at + k < b.Count; k++) b[at + k] = r.Next(2) == 0 ? (byte)0xff : (byte)0;
                    break;
            }
        }
        return [.. b];
    }

    private static void FuzzQemu(byte[] input, Random r)
    {
        var parser = new QemuStreamParser();
        int start = 0, end = 0;
        while (true)
        {
            bool final = end == input.Length;
            while (parser.TryRead(input.AsSpan(start, end - start), final, out var seg))
            {
                if (seg.Length < 0 || start + seg.Length > end) throw new InvalidOperationException($"segment of {seg.Length} bytes at {start} beyond {end}");
                if (!parser.IsOpaque && seg.Length > QemuStreamParser.MaxRecordLength) throw new InvalidOperationException($"{seg.Kind} segment of {seg.Length} bytes at {start} (max {QemuStreamParser.MaxRecordLength})");
                if (seg.Kind == SegmentKind.Page && seg.Length != seg.HeaderLength + QemuFormat.PageSize) throw new InvalidOperationException("page segment length");
                start += seg.Length;
            }
            if (final) break;
            end = Math.Min(input.Length, end + 1 + r.Next(70_000));
        }
        if (start != input.Length) throw new InvalidOperationException($"parser stopped at {start} of {input.Length}");
    }

    private static List<byte[]> FrameCorpus()
    {
        var ms = new MemoryStream();
        using (var w = new FrameWriter(ms, CompressionMode.Zstd))
        {
            var hello = new Hello(StreamKind.Mig, true, Guid.NewGuid(), 3, new byte[16], 9, new byte[32], "host").Encode();
            w.WriteAsync(FrameType.Hello, hello, false, default).AsTask().Wait();
            w.WriteAsync(FrameType.MigData, new byte[5000], true, default).AsTask().Wait();
            var lz = new FrameWriter(ms, CompressionMode.Lz4);
            lz.WriteAsync(FrameType.Tunnel, System.Text.Encoding.ASCII.GetBytes(string.Concat(Enumerable.Repeat("nbd ", 3000))), true, default).AsTask().Wait();
            w.WriteAsync(FrameType.End, new EndMessage(4, new byte[16], true).Encode(), false, default).AsTask().Wait();
            w.WriteAsync(FrameType.Abort, "reason"u8.ToArray(), false, default).AsTask().Wait();
        }
        return [ms.ToArray()];
    }

    private static void FuzzFrames(byte[] input, Random r)
    {
        using var reader = new FrameReader(new MemoryStream(input), TimeSpan.FromSeconds(5));
        try
        {
            while (reader.ReadAsync(default).AsTask().GetAwaiter().GetResult() is { } f)
            {
                switch (f.Type)
                {
                    case FrameType.Hello: Hello.Decode(f.Payload.Span); break;
                    case FrameType.HelloReply: HelloReply.Decode(f.Payload.Span); break;
                    case FrameType.End: EndMessage.Decode(f.Payload.Span); break;
                    case FrameType.EndAck: EndAck.Decode(f.Payload.Span); break;
                    case FrameType.MigDoubt: MemoryDoubt.Decode(f.Payload.Span); break;
                }
            }
        }
        catch (PeerProtocolException)
        {
        }
        int pos = 0;
        try
        {
            while (FrameCodec.TryReadFrame(input.AsSpan(pos), pos, out _, out _, out int used)) pos += used;
        }
        catch (PeerProtocolException)
        {
        }
    }

    // PSK-sealed frames: whatever the mutation, a frame either opens to exactly what was sealed at
    // its place in the sequence or the stream ends with PeerProtocolException.
    // Plain constants: under afl nothing of the instrumented assembly may run before the fuzzer's
    // shared memory is set up (static initialisers included).
    private static readonly byte[] SealKey = "bfmig fuzz frame key, 32 bytes.."u8.ToArray();

    private static readonly (FrameType Type, byte[] Payload, bool Compress)[] Sealed = SealedFrames();

    private static (FrameType, byte[], bool)[] SealedFrames()
    {
        var incompressible = new byte[70_000];
        new Random(5).NextBytes(incompressible);
        var end = new byte[25];
        end[7] = 4;
        end[24] = 1;
        return
        [
            (FrameType.MigData, new byte[5000], true),
            (FrameType.Tunnel, incompressible, true),
            (FrameType.Progress, new byte[8], false),
            (FrameType.End, end, false),
            (FrameType.TunnelEof, [], false),
        ];
    }

    private static List<byte[]> SealedCorpus()
    {
        var ms = new MemoryStream();
        using (var w = new FrameWriter(ms, CompressionMode.Zstd))
        {
            w.Protect(new FrameSealer(SealKey));
            foreach (var (type, payload, compress) in Sealed)
                w.WriteAsync(type, payload, compress, default).AsTask().Wait();
        }
        return [ms.ToArray()];
    }

    private static void FuzzSealed(byte[] input, Random r)
    {
        using var reader = new FrameReader(new MemoryStream(input), TimeSpan.FromSeconds(5));
        reader.Protect(new FrameSealer(SealKey));
        int i = 0;
        try
        {
            while (reader.ReadAsync(default).AsTask().GetAwaiter().GetResult() is { } f)
            {
                if (i >= Sealed.Length || f.Type != Sealed[i].Type || !f.Payload.Span.SequenceEqual(Sealed[i].Payload))
                    throw new InvalidOperationException($"sealed frame {i} opened to content that was never sealed there");
                i++;
            }
        }
        catch (PeerProtocolException)
        {
        }
    }

    // Every ops input starts a trip and abandons it, which fsyncs: on tmpfs that costs nothing
    // (on disk it held afl++ to 9 inputs/s).
    private static readonly string StoreRoot = Path.Combine(Directory.Exists("/dev/shm") ? "/dev/shm" : Path.GetTempPath(), "bfmig-fuzz-store-" + Environment.ProcessId);

    private static List<byte[]> OpsCorpus()
    {
        // Real ops: a fixture encoded against a store that already holds it (elide runs, refs), and in full.
        var stream = LoadFixtures()[0];
        var list = new List<byte[]>();
        var guestA = Guid.NewGuid();
        using var a = MemoryStore.Open(StoreRoot, guestA);
        foreach (bool synced in new[] { false, true })
        {
            var enc = new MigEncoder(a, synced, a.State.Seed, new TransferStats());
            int pos = 0;
            while (pos < stream.Length)
            {
                pos += enc.Consume(stream.AsSpan(pos), true);
                enc.CompleteOps();
                if (enc.OpsLength > 0) list.Add(enc.Ops.ToArray());
                enc.ResetOps();
            }
            a.Commit(1, "x", true);
        }
        return list;
    }

    private static MemoryStore? _opsStore;

    private static void FuzzOps(byte[] input, Random r)
    {
        // One store for the whole run: every input starts a trip on it and abandons it, as a failed stream would.
        _opsStore ??= MemoryStore.Open(StoreRoot, Guid.NewGuid());
        var store = _opsStore;
        {
            var dec = new MigDecoder(store, r.Next(2) == 0, store.State.Seed, new TransferStats());
            try
            {
                dec.BeginFrame();
                int pos = 0;
                do
                {
                    pos = dec.Process(input, pos);
                    dec.ResetOutput();
                }
                while (pos < input.Length || dec.HasPendingOutput);
            }
            catch (PeerProtocolException)
            {
            }
            store.Abandon();
            for (int b = 0; b < store.BlockCount; b++)
            {
                for (long p = 0; p < store.PageCount(b); p++)
                {
                    var h = store.GetHash(b, p);
                    if (h != UInt128.Zero && store.Hash(store.Page(b, p)) != h) throw new InvalidOperationException($"store index wrong for block {b} page {p}");
                }
            }
        }
    }
}
