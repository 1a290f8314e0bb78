using System.Buffers.Binary;
using System.Diagnostics;
using System.Globalization;
using System.IO.Hashing;
using System.Net.Sockets;
using System.Text.Json;
using BFMig.Transfer.Memory;

namespace BFMig.Benchmarks;

/// <summary>
/// What a big guest costs the helpers: a return trip of a memory stream of GiB size, through the
/// shipped bfmig-transfer executables (two processes, stores on disk, PSK frames over a Unix
/// socket), each run under /usr/bin/time for its CPU seconds and peak RSS. The pages are real-file
/// pages (shared libraries, Python sources) with each page's number stamped in, so none repeats;
/// trip 1 (A->B) seeds both stores, then a given share of the pages changes and trip 2 (B->A) is
/// the one reported. Every byte the receiving helper hands to "QEMU" is hashed and compared with
/// what the source wrote.
/// </summary>
[System.Runtime.Versioning.SupportedOSPlatform("linux")]
internal static class BigReplay
{
    private static readonly Guid Guest = Guid.Parse("0b16a000-5e1a-4c1e-9a00-000000000016");

    private sealed record Side(double Seconds, double UserSeconds, double SystemSeconds, long MaxRssKiB);

    public static int Run(string helper, int gib, int changedPercent)
    {
        if (!File.Exists(helper))
        {
            Console.Error.WriteLine($"replay-big: no helper at {helper} (publish bfmig-transfer first: make bench-big)");
            return 2;
        }
        long pages = (long)gib << 18;
        var corpus = RealFilePages.Take(0, 1 << 16);
        string work = Path.Combine(Path.GetTempPath(), "bfmig-bench-big-" + Guid.NewGuid().ToString("N")[..8]);
        Directory.CreateDirectory(work);
        try
        {
            string psk = Path.Combine(work, "psk");
            File.WriteAllBytes(psk, System.Security.Cryptography.RandomNumberGenerator.GetBytes(32));
            File.SetUnixFileMode(psk, UnixFileMode.UserRead | UnixFileMode.UserWrite);
            Console.WriteLine($"replay-big: {gib} GiB guest ({pages} pages of real files), {changedPercent} % changed before the return, load average "
                + $"{File.ReadAllText("/proc/loadavg").Split(' ')[0]} on {Environment.ProcessorCount} cores; helper {helper}");
            var first = Trip(helper, work, psk, "1", from: "a", to: "b", pages, corpus, changedPercent: 0);
            Print("trip 1 A->B (nothing retained)", first, gib);
            var back = Trip(helper, work, psk, "2", from: "b", to: "a", pages, corpus, changedPercent);
            Print($"trip 2 B->A ({changedPercent} % changed)", back, gib);
            return 0;
        }
        finally
        {
            Directory.Delete(work, recursive: true);
        }
    }

    private sealed record TripResult(Side Sender, Side Receiver, long StreamBytes, long WireBytes, string Mode);

    private static void Print(string name, TripResult t, int gib)
    {
        double s = t.Sender.UserSeconds + t.Sender.SystemSeconds, r = t.Receiver.UserSeconds + t.Receiver.SystemSeconds;
        Console.WriteLine(string.Create(CultureInfo.InvariantCulture,
            $"{name}: {t.StreamBytes / 1e9:F2} GB stream, {t.WireBytes / 1e9:F3} GB on the wire ({100.0 * t.WireBytes / t.StreamBytes:F1} %), receiver {t.Mode}, {t.Sender.Seconds:F1} s wall\n"
            + $"    sender   {s / gib:F2} CPU s per GiB (user {t.Sender.UserSeconds:F1} s, system {t.Sender.SystemSeconds:F1} s), peak RSS {t.Sender.MaxRssKiB / 1024.0:F0} MiB\n"
            + $"    receiver {r / gib:F2} CPU s per GiB (user {t.Receiver.UserSeconds:F1} s, system {t.Receiver.SystemSeconds:F1} s), peak RSS {t.Receiver.MaxRssKiB / 1024.0:F0} MiB"));
    }

    private static TripResult Trip(string helper, string work, string psk, string n, string from, string to, long pages, byte[][] corpus, int changedPercent)
    {
        string source = Path.Combine(work, $"source{n}.sock"), peer = Path.Combine(work, $"peer{n}.sock"), sink = Path.Combine(work, $"sink{n}.sock");
        string sendStats = Path.Combine(work, $"send{n}.json"), recvStats = Path.Combine(work, $"recv{n}.json");
        string sendTime = Path.Combine(work, $"send{n}.time"), recvTime = Path.Combine(work, $"recv{n}.time");
        using var sinkListener = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        sinkListener.Bind(new UnixDomainSocketEndPoint(sink));
        sinkListener.Listen(1);
        var sinkTask = Task.Run(() => Drain(sinkListener));
        using var receiver = Timed(recvTime, helper, "receive", "--kind", "mig", "--listen", $"unix:{peer}", "--connect", $"unix:{sink}",
            "--store", Path.Combine(work, $"store-{to}"), "--guest", Guest.ToString(), "--psk-file", psk, "--stats", recvStats, "--name", to,
            "--accept-timeout", "60", "--idle-timeout", "120");
        WaitForFile(peer, receiver);
        using var sender = Timed(sendTime, helper, "send", "--kind", "mig", "--listen", $"unix:{source}", "--peer", $"unix:{peer}",
            "--store", Path.Combine(work, $"store-{from}"), "--guest", Guest.ToString(), "--peer-name", to, "--name", from, "--psk-file", psk,
            "--stats", sendStats, "--accept-timeout", "60", "--idle-timeout", "120");
        WaitForFile(source, sender);
        var wrote = Generate(source, pages, corpus, changedPercent);
        sender.WaitForExit();
        receiver.WaitForExit();
        var (read, readHash) = sinkTask.GetAwaiter().GetResult();
        if (sender.ExitCode != 0 || receiver.ExitCode != 0)
            throw new InvalidOperationException($"trip {n}: sender exit {sender.ExitCode} ({sender.StandardError.ReadToEnd()}), receiver exit {receiver.ExitCode} ({receiver.StandardError.ReadToEnd()})");
        if (read != wrote.Bytes || readHash != wrote.Hash)
            throw new InvalidOperationException($"trip {n}: the destination got {read} bytes (hash {readHash:x}) of {wrote.Bytes} (hash {wrote.Hash:x})");
        using var stats = JsonDocument.Parse(File.ReadAllBytes(sendStats));
        using var rstats = JsonDocument.Parse(File.ReadAllBytes(recvStats));
        return new TripResult(ReadTime(sendTime), ReadTime(recvTime), wrote.Bytes, stats.RootElement.GetProperty("wireBytesOut").GetInt64(),
            rstats.RootElement.TryGetProperty("mode", out var m) ? m.GetString() ?? "?" : "?");
    }

    private static Process Timed(string timeFile, string helper, params string[] args)
    {
        var psi = new ProcessStartInfo("/usr/bin/time") { RedirectStandardError = true, RedirectStandardOutput = true };
        foreach (var a in (string[])["-f", "%e %U %S %M", "-o", timeFile, helper, .. args])
            psi.ArgumentList.Add(a);
        return Process.Start(psi) ?? throw new InvalidOperationException("cannot start /usr/bin/time");
    }

    private static Side ReadTime(string file)
    {
        var f = File.ReadAllLines(file).Last().Split(' ');
        return new Side(double.Parse(f[0], CultureInfo.InvariantCulture), double.Parse(f[1], CultureInfo.InvariantCulture),
            double.Parse(f[2], CultureInfo.InvariantCulture), long.Parse(f[3], CultureInfo.InvariantCulture));
    }

    private static void WaitForFile(string path, Process owner)
    {
        var sw = Stopwatch.StartNew();
        while (!File.Exists(path))
        {
            if (owner.HasExited || sw.Elapsed > TimeSpan.FromSeconds(30))
                throw new InvalidOperationException($"{path} never appeared: {owner.StandardError.ReadToEnd()}");
            Thread.Sleep(10);
        }
    }

    private static (long Bytes, UInt128 Hash) Drain(Socket listener)
    {
        using var s = listener.Accept();
        var hash = new XxHash128();
        var buffer = new byte[1 << 20];
        long total = 0;
        int n;
        while ((n = s.Receive(buffer)) > 0)
        {
            hash.Append(buffer.AsSpan(0, n));
            total += n;
        }
        return (total, hash.GetCurrentHashAsUInt128());
    }

    // The page at <index>: a real-file page with the page number and its version stamped into its
    // first 16 bytes. Version 1 for the pages the return trip finds changed.
    private static void Page(Span<byte> into, byte[][] corpus, long index, int version)
    {
        corpus[(int)((index * 7919 + version * 104729) % corpus.Length)].CopyTo(into);
        BinaryPrimitives.WriteInt64LittleEndian(into, index);
        BinaryPrimitives.WriteInt64LittleEndian(into[8..], version);
    }

    // Replay's stream, made on the fly (it does not fit in memory), hashed as it goes out.
    private static (long Bytes, UInt128 Hash) Generate(string socketPath, long pages, byte[][] corpus, int changedPercent)
    {
        using var s = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        s.Connect(new UnixDomainSocketEndPoint(socketPath));
        var hashed = new HashingStream(new NetworkStream(s, ownsSocket: false));
        using (var output = new BufferedStream(hashed, 1 << 20))
            Replay.WriteStream(output, pages, (i, into) => Page(into, corpus, i, changedPercent > 0 && i % 100 < changedPercent ? 1 : 0));
        s.Shutdown(SocketShutdown.Send);
        // QEMU waits for the destination's end of the stream; the helper closes when done.
        var scratch = new byte[64];
        while (s.Receive(scratch) > 0)
        {
        }
        return (hashed.Bytes, hashed.Hash.GetCurrentHashAsUInt128());
    }

    // Passes writes on to the socket, counting and hashing them.
    private sealed class HashingStream(Stream inner) : Stream
    {
        public XxHash128 Hash { get; } = new();
        public long Bytes { get; private set; }

        public override void Write(ReadOnlySpan<byte> buffer)
        {
            Hash.Append(buffer);
            Bytes += buffer.Length;
            inner.Write(buffer);
        }

        public override void Write(byte[] buffer, int offset, int count) => Write(buffer.AsSpan(offset, count));
        public override void Flush() => inner.Flush();
        public override bool CanRead => false;
        public override bool CanSeek => false;
        public override bool CanWrite => true;
        public override long Length => throw new NotSupportedException();
        public override long Position { get => throw new NotSupportedException(); set => throw new NotSupportedException(); }
        public override int Read(byte[] buffer, int offset, int count) => throw new NotSupportedException();
        public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();
        public override void SetLength(long value) => throw new NotSupportedException();
    }
}
