using System.Buffers.Binary;
using System.IO.Hashing;
using BFMig.Native.Linux;
using Microsoft.Win32.SafeHandles;

namespace BFMig.Transfer.Memory;

/// <summary>
/// The in-flux journal of a memory store, <c>mem/INFLUX</c>: which pages trips since the last
/// commit may have written into the page files (or whose index a commit may have half-written).
/// Each host keeps its own; the next trip's hello reply and first frame carry both, and both sides
/// treat their union as unknown.
/// <para>
/// Crash consistency without an fsync per page run: a trip's journal is <em>live</em>, stamped with
/// the kernel's boot id, made durable (file and directory) before the first page is written, and
/// each run of pages is appended (one write, no fsync) before its pwrite is issued. A process
/// killed at any point leaves every issued pwrite covered in the page cache, which outlives it; a
/// machine that crashed comes back with another boot id, and a live journal of another boot puts
/// the whole store in doubt (as before journals: rehash, generation 0). A trip that ends without a
/// commit, or the next open after a killed one, rewrites it <em>settled</em> (exact, fsynced, no
/// boot id), which holds across reboots. Anything that does not read as a journal (the empty
/// <c>INFLUX</c> of older helpers, a damaged record) puts the whole store in doubt.
/// </para>
/// </summary>
public sealed class MemoryDoubtJournal : IDisposable
{
    public const string FileName = "INFLUX";
    // Header: "BFMMEMD1", 16-byte boot id (zero: settled), u64 XxHash64 of those 24 bytes.
    // Records: i64 block, i64 first page, i64 count, u64 XxHash64 of those 24 bytes. Little-endian.
    private static ReadOnlySpan<byte> Magic => "BFMMEMD1"u8;
    private const int RecordLength = 32;
    private const int CompactAt = 1 << 16;

    private readonly string _path;
    private readonly MemoryDoubt _prior;
    private readonly List<PageRange> _touched = [];
    private SafeFileHandle? _file;
    private long _end;

    private MemoryDoubtJournal(string path, MemoryDoubt prior, SafeFileHandle? file, long end)
    {
        _path = path;
        _prior = prior;
        _file = file;
        _end = end;
    }

    /// <summary>The journal file of the store in <paramref name="memDir"/>.</summary>
    public static string PathIn(string memDir) => Path.Combine(memDir, FileName);

    /// <summary>
    /// What the journal in <paramref name="memDir"/> puts in doubt (<see cref="MemoryDoubt.None"/>
    /// without one); <paramref name="live"/> tells whether it is a trip's live journal of this boot.
    /// </summary>
    /// <exception cref="IOException">the journal exists but cannot be read.</exception>
    public static MemoryDoubt Read(string memDir, out bool live)
    {
        live = false;
        byte[] content;
        try
        {
            content = File.ReadAllBytes(PathIn(memDir));
        }
        catch (Exception e) when (e is FileNotFoundException or DirectoryNotFoundException)
        {
            return MemoryDoubt.None;
        }
        if (content.Length < RecordLength || !content.AsSpan(0, Magic.Length).SequenceEqual(Magic) || content.Length % RecordLength != 0
            || !Sealed(content.AsSpan(0, RecordLength)))
            return MemoryDoubt.All;
        var boot = content.AsSpan(Magic.Length, 16);
        if (boot.IndexOfAnyExcept((byte)0) >= 0)
        {
            // A live journal is only complete in the page cache of the boot that wrote it.
            if (!boot.SequenceEqual(BootId.Value)) return MemoryDoubt.All;
            live = true;
        }
        var ranges = new List<PageRange>();
        for (int at = RecordLength; at < content.Length; at += RecordLength)
        {
            var record = content.AsSpan(at, RecordLength);
            long block = BinaryPrimitives.ReadInt64LittleEndian(record);
            long first = BinaryPrimitives.ReadInt64LittleEndian(record[8..]);
            long count = BinaryPrimitives.ReadInt64LittleEndian(record[16..]);
            if (!Sealed(record) || block < 0 || block > int.MaxValue || first < 0 || count <= 0 || first > MemoryDoubt.MaxPages || count > MemoryDoubt.MaxPages)
                return MemoryDoubt.All;
            ranges.Add(new PageRange((int)block, first, count));
        }
        return MemoryDoubt.Of(ranges);
    }

    /// <summary>Marks the whole store in <paramref name="memDir"/> in doubt, durably.</summary>
    public static void DoubtAll(string memDir) => DurableFile.WriteAtomically(PathIn(memDir), "in flux\n"u8);

    /// <summary>Replaces the journal with <paramref name="doubt"/>, settled (exact, durable, valid across reboots).</summary>
    public static void WriteSettled(string memDir, MemoryDoubt doubt)
    {
        if (doubt.Whole)
            DoubtAll(memDir);
        else
            DurableFile.WriteAtomically(PathIn(memDir), Encode(new byte[16], doubt.Ranges));
    }

    /// <summary>
    /// Starts a trip's live journal in <paramref name="memDir"/>, keeping what earlier trips left
    /// in doubt (<paramref name="prior"/>). Durable on return: from then on the store is only
    /// trusted minus the journal.
    /// </summary>
    public static MemoryDoubtJournal Begin(string memDir, MemoryDoubt prior)
    {
        string path = PathIn(memDir);
        if (prior.Whole)
        {
            DoubtAll(memDir);
            return new MemoryDoubtJournal(path, prior, null, 0);
        }
        var content = Encode(BootId.Value, prior.Ranges);
        DurableFile.WriteAtomically(path, content);
        return new MemoryDoubtJournal(path, prior, File.OpenHandle(path, FileMode.Open, FileAccess.Write), content.Length);
    }

    /// <summary>
    /// Pages [<paramref name="first"/>, +<paramref name="count"/>) of <paramref name="block"/> are
    /// about to be written (data or index): returns once that is in the journal.
    /// </summary>
    public void Touching(int block, long first, long count)
    {
        if (_touched.Count > 0 && _touched[^1].Block == block && _touched[^1].First <= first && first <= _touched[^1].End)
        {
            var last = _touched[^1];
            if (first + count <= last.End) return; // already journaled
            _touched[^1] = last with { Count = first + count - last.First };
        }
        else
        {
            _touched.Add(new PageRange(block, first, count));
        }
        if (_touched.Count > CompactAt)
        {
            var compact = MemoryDoubt.Of(_touched).Ranges;
            _touched.Clear();
            _touched.AddRange(compact);
        }
        if (_file is null) return;
        Span<byte> record = stackalloc byte[RecordLength];
        WriteRecord(record, new PageRange(block, first, count));
        RandomAccess.Write(_file, record, _end);
        _end += RecordLength;
    }

    /// <summary>What this journal puts in doubt so far: the earlier trips' doubt and this trip's writes.</summary>
    public MemoryDoubt Doubt => _prior.Union(MemoryDoubt.Of(_touched));

    /// <summary>
    /// The trip ends without a commit: the journal becomes <paramref name="doubt"/> (at least
    /// <see cref="Doubt"/>), settled; a crash meanwhile leaves the live one, which covers this trip.
    /// </summary>
    public void Settle(MemoryDoubt? doubt = null)
    {
        Close();
        WriteSettled(Path.GetDirectoryName(_path)!, Doubt.Union(doubt ?? MemoryDoubt.None));
    }

    /// <summary>The trip committed: nothing is in doubt any more.</summary>
    public void Clear()
    {
        Close();
        File.Delete(_path);
        DurableFile.FsyncDirectory(Path.GetDirectoryName(_path)!);
    }

    private void Close()
    {
        _file?.Dispose();
        _file = null;
    }

    /// <inheritdoc/>
    public void Dispose() => Close();

    private static byte[] Encode(ReadOnlySpan<byte> boot, IReadOnlyList<PageRange> ranges)
    {
        var b = new byte[RecordLength * (1 + ranges.Count)];
        Magic.CopyTo(b);
        boot.CopyTo(b.AsSpan(Magic.Length, 16));
        BinaryPrimitives.WriteUInt64LittleEndian(b.AsSpan(24), XxHash64.HashToUInt64(b.AsSpan(0, 24)));
        for (int i = 0; i < ranges.Count; i++)
            WriteRecord(b.AsSpan(RecordLength * (i + 1), RecordLength), ranges[i]);
        return b;
    }

    private static void WriteRecord(Span<byte> record, PageRange r)
    {
        BinaryPrimitives.WriteInt64LittleEndian(record, r.Block);
        BinaryPrimitives.WriteInt64LittleEndian(record[8..], r.First);
        BinaryPrimitives.WriteInt64LittleEndian(record[16..], r.Count);
        BinaryPrimitives.WriteUInt64LittleEndian(record[24..], XxHash64.HashToUInt64(record[..24]));
    }

    private static bool Sealed(ReadOnlySpan<byte> record) => BinaryPrimitives.ReadUInt64LittleEndian(record[24..]) == XxHash64.HashToUInt64(record[..24]);

    /// <summary>
    /// The kernel's boot id (16 bytes). Unreadable: random per process, so that a live journal is
    /// never trusted after its writer is gone.
    /// </summary>
    private static class BootId
    {
        public static readonly byte[] Value = Load();

        private static byte[] Load()
        {
            try
            {
                if (Guid.TryParse(File.ReadAllText("/proc/sys/kernel/random/boot_id").Trim(), out var id) && id != Guid.Empty)
                    return id.ToByteArray();
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException)
            {
            }
            return Guid.NewGuid().ToByteArray();
        }
    }
}
