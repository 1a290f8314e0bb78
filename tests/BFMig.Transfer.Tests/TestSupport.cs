using System.Buffers.Binary;
using System.Text;
using BFMig.Native.Compression;
using BFMig.Transfer.Memory;

namespace BFMig.Transfer.Tests;

/// <summary>Loads the captured QEMU streams in Fixtures/.</summary>
internal static class Fixtures
{
    public static readonly string[] Streams =
        ["q72-pc-paused.bin", "q72-q35-paused.bin", "q72-pc-xbzrle.bin", "q10-pc-paused.bin", "q10-q35-xbzrle.bin"];

    public static string Dir => Path.Combine(AppContext.BaseDirectory, "Fixtures");

    public static byte[] Load(string name)
    {
        var z = File.ReadAllBytes(Path.Combine(Dir, name + ".zst"));
        using var codec = new ZstdCodec();
        var buffer = new byte[32 << 20];
        int n = codec.Decompress(z, buffer);
        return buffer[..n];
    }
}

/// <summary>Writes synthetic QEMU 7.2-style migration streams.</summary>
internal sealed class StreamBuilder
{
    private readonly MemoryStream _s = new();
    private readonly List<(string Name, long Length)> _blocks = [];
    private int _lastBlock = -1;

    public byte[] ToArray() => _s.ToArray();

    public StreamBuilder U8(byte v) { _s.WriteByte(v); return this; }
    public StreamBuilder Be16(ushort v) { Span<byte> b = stackalloc byte[2]; BinaryPrimitives.WriteUInt16BigEndian(b, v); _s.Write(b); return this; }
    public StreamBuilder Be32(uint v) { Span<byte> b = stackalloc byte[4]; BinaryPrimitives.WriteUInt32BigEndian(b, v); _s.Write(b); return this; }
    public StreamBuilder Be64(ulong v) { Span<byte> b = stackalloc byte[8]; BinaryPrimitives.WriteUInt64BigEndian(b, v); _s.Write(b); return this; }
    public StreamBuilder Bytes(ReadOnlySpan<byte> b) { _s.Write(b); return this; }
    public StreamBuilder Str8(string s) { var b = Encoding.UTF8.GetBytes(s); U8((byte)b.Length); return Bytes(b); }

    public StreamBuilder Header(string machine = "pc-i440fx-7.2")
    {
        Be32(QemuFormat.FileMagic).Be32(3).U8(QemuFormat.Configuration);
        var m = Encoding.UTF8.GetBytes(machine);
        return Be32((uint)m.Length).Bytes(m);
    }

    public StreamBuilder RamStart(params (string Name, long Length)[] blocks)
    {
        _blocks.AddRange(blocks);
        U8(QemuFormat.SectionStart).Be32(2).Str8("ram").Be32(0).Be32(4);
        Be64((ulong)blocks.Sum(b => b.Length) | QemuFormat.FlagMemSize);
        foreach (var (n, l) in blocks) Str8(n).Be64((ulong)l);
        return Eos().Footer();
    }

    public StreamBuilder Part() => U8(QemuFormat.SectionPart).Be32(2);
    public StreamBuilder End() => U8(QemuFormat.SectionEnd).Be32(2);
    public StreamBuilder Eos() => Be64(QemuFormat.FlagEos);
    public StreamBuilder Footer() => U8(QemuFormat.SectionFooter).Be32(2);

    private void RecordHeader(int block, long page, ulong flag)
    {
        bool cont = block == _lastBlock;
        Be64(((ulong)page << 12) | flag | (cont ? QemuFormat.FlagContinue : 0));
        if (!cont) Str8(_blocks[block].Name);
        _lastBlock = block;
    }

    public StreamBuilder Page(int block, long page, ReadOnlySpan<byte> content)
    {
        RecordHeader(block, page, QemuFormat.FlagPage);
        return Bytes(content);
    }

    public StreamBuilder Zero(int block, long page)
    {
        RecordHeader(block, page, QemuFormat.FlagZero);
        return U8(0);
    }

    public StreamBuilder Xbzrle(int block, long page, ReadOnlySpan<byte> data)
    {
        RecordHeader(block, page, QemuFormat.FlagXbzrle);
        U8(1).Be16((ushort)data.Length);
        return Bytes(data);
    }

    /// <summary>Device state (not parsed) and the end of the stream.</summary>
    public StreamBuilder DeviceStateAndEof()
    {
        U8(QemuFormat.SectionFull).Be32(3).Str8("timer").Be32(0).Be32(2);
        Bytes(new byte[] { 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13 });
        Footer();
        return U8(QemuFormat.SectionEof);
    }

    /// <summary>A whole stream: every page of every block once (zero pages as ZERO), then <paramref name="dirty"/> resent in a second pass.</summary>
    public static byte[] FullStream(IReadOnlyList<(string Name, byte[][] Pages)> blocks, IEnumerable<(int Block, long Page)>? dirty = null)
    {
        var b = new StreamBuilder().Header().RamStart(blocks.Select(x => (x.Name, (long)x.Pages.Length * 4096)).ToArray());
        b.Part();
        for (int i = 0; i < blocks.Count; i++)
        {
            for (int p = 0; p < blocks[i].Pages.Length; p++)
            {
                var c = blocks[i].Pages[p];
                if (c.AsSpan().IndexOfAnyExcept((byte)0) < 0) b.Zero(i, p);
                else b.Page(i, p, c);
            }
        }
        b.Eos().Footer().End();
        foreach (var (bl, pg) in dirty ?? [])
            b.Page(bl, pg, blocks[bl].Pages[pg]);
        return b.Eos().Footer().DeviceStateAndEof().ToArray();
    }
}

/// <summary>A temporary directory removed at dispose.</summary>
internal sealed class TempDir : IDisposable
{
    public TempDir() => Directory.CreateDirectory(Path);
    public string Path { get; } = System.IO.Path.Combine(System.IO.Path.GetTempPath(), "bfmig-test-" + Guid.NewGuid().ToString("N")[..12]);
    public void Dispose()
    {
        try { Directory.Delete(Path, recursive: true); } catch (IOException) { } catch (UnauthorizedAccessException) { }
    }
}

/// <summary>Skips locally, fails under CI=true, when something a test needs is missing.</summary>
internal static class Require
{
    public static bool Available(bool condition, string what)
    {
        if (condition) return true;
        if (Environment.GetEnvironmentVariable("CI") == "true") Assert.Fail($"required for this test and missing: {what}");
        Console.WriteLine($"SKIPPED (not CI): missing {what}");
        return false;
    }
}
