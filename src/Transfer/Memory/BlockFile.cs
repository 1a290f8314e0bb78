using System.IO.MemoryMappedFiles;
using System.Runtime.InteropServices;
using BFMig.Native.Linux;
using Microsoft.Win32.SafeHandles;

namespace BFMig.Transfer.Memory;

/// <summary>
/// One RAMBlock in the store: a sparse, page-addressed data file (read and written with
/// pread/pwrite: on ext4 that is about ten times faster than first-touch writes through a shared
/// mapping) and its page-hash index (in memory while a trip runs, written back at commit).
/// Hash 0 means "unknown".
/// </summary>
internal sealed unsafe class BlockFile : IDisposable
{
    private readonly SafeFileHandle _data;
    private MemoryMappedFile? _map;
    private MemoryMappedViewAccessor? _view;
    private byte* _mapped;

    public BlockFile(string dataPath, string hashPath, string name, long length, bool loadIndex)
    {
        Name = name;
        Length = length;
        DataPath = dataPath;
        HashPath = hashPath;
        Hashes = new UInt128[length >> QemuFormat.PageShift];
        _data = File.OpenHandle(dataPath, FileMode.OpenOrCreate, FileAccess.ReadWrite, FileShare.Read);
        long had = RandomAccess.GetLength(_data);
        if (had != length) RandomAccess.SetLength(_data, length);
        if (had == 0) _writtenSinceCreated = new ulong[(Hashes.LongLength + 63) >> 6];
        if (loadIndex && File.Exists(hashPath))
        {
            using var hs = new FileStream(hashPath, FileMode.Open, FileAccess.Read);
            if (hs.Length == Hashes.LongLength * 16)
            {
                hs.ReadExactly(MemoryMarshal.AsBytes(Hashes.AsSpan()));
                IndexLoaded = true;
            }
        }
    }

    /// <summary>The index was read whole from its file (false: absent or of the wrong length, every page unknown).</summary>
    public bool IndexLoaded { get; }

    public string Name { get; }
    public long Length { get; }
    public string DataPath { get; }
    public string HashPath { get; }
    public UInt128[] Hashes { get; }
    public long PageCount => Hashes.LongLength;

    // For a data file this object created (one hole): the pages anything has written since, pending
    // writes included (the store marks a page as it buffers it). Null for a file that existed.
    private readonly ulong[]? _writtenSinceCreated;

    /// <summary>True when the page is part of the hole this object created the data file as: it reads as zeros.</summary>
    public bool NeverWritten(long page) => _writtenSinceCreated is { } w && (w[page >> 6] & (1UL << (int)(page & 63))) == 0;

    /// <summary>Notes that the page is about to be written (before the write, or its buffering).</summary>
    public void MarkWritten(long page)
    {
        if (_writtenSinceCreated is { } w) w[page >> 6] |= 1UL << (int)(page & 63);
    }

    public void Read(long page, Span<byte> destination) => ReadPages(page, destination[..QemuFormat.PageSize]);

    /// <summary>Reads consecutive pages from <paramref name="page"/> into all of <paramref name="destination"/>.</summary>
    public void ReadPages(long page, Span<byte> destination)
    {
        long offset = page << QemuFormat.PageShift;
        int done = 0;
        while (done < destination.Length)
        {
            int n = RandomAccess.Read(_data, destination[done..], offset + done);
            if (n == 0)
            {
                destination[done..].Clear();
                return;
            }
            done += n;
        }
    }

    /// <summary>
    /// True when page <paramref name="page"/> holds exactly <paramref name="content"/>. Read
    /// through a read-only shared mapping of the data file, made on first use: the page cache is
    /// compared in place, with no system call or copy per page (the sender compares every
    /// unchanged page). Writes still go through pwrite, which the mapping sees at once.
    /// </summary>
    public bool PageEquals(long page, ReadOnlySpan<byte> content) => View(page).SequenceEqual(content);

    /// <summary>
    /// Page <paramref name="page"/> as the page cache holds it, through the same mapping: no system
    /// call or copy. A live view: its bytes change when the file is written, so it is read under
    /// the store's gate and before any write; pending writes are the caller's to flush first. An
    /// I/O error reading the page through the mapping ends the process (SIGBUS) where pread would
    /// throw: the trip fails either way, with the guest on the source and the pages in doubt.
    /// </summary>
    public ReadOnlySpan<byte> View(long page)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(page);
        ArgumentOutOfRangeException.ThrowIfGreaterThanOrEqual(page, PageCount);
        if (_mapped == null) Map();
        NoteCompared(page);
        return new ReadOnlySpan<byte>(_mapped + (page << QemuFormat.PageShift), QemuFormat.PageSize);
    }

    // A return trip compares nearly every page of the store: left mapped, all of them count in
    // the helper's RSS (16 GiB for a 16 GiB guest, make bench-big), which reads as a leak to an
    // operator and weighs on a memory-limited service's accounting, though the kernel could drop
    // them. Every ReleaseEvery pages compared, the range compared since is unmapped again (the
    // page cache keeps it). Streams compare in ascending order, so the range stays small.
    private const int ReleaseEvery = 16384;
    private long _comparedFrom = long.MaxValue;
    private long _comparedTo;
    private int _compared;

    private void NoteCompared(long page)
    {
        _comparedFrom = Math.Min(_comparedFrom, page);
        _comparedTo = Math.Max(_comparedTo, page + 1);
        if (++_compared < ReleaseEvery) return;
        MappedPages.Release(_mapped + (_comparedFrom << QemuFormat.PageShift), (_comparedTo - _comparedFrom) << QemuFormat.PageShift);
        (_comparedFrom, _comparedTo, _compared) = (long.MaxValue, 0, 0);
    }

    private void Map()
    {
        _map = MemoryMappedFile.CreateFromFile(_data, null, Length, MemoryMappedFileAccess.Read, HandleInheritability.None, leaveOpen: true);
        _view = _map.CreateViewAccessor(0, Length, MemoryMappedFileAccess.Read);
        byte* p = null;
        _view.SafeMemoryMappedViewHandle.AcquirePointer(ref p);
        _mapped = p + _view.PointerOffset;
    }

    /// <summary>Writes consecutive pages from <paramref name="page"/> (all of <paramref name="content"/>); the caller has marked them (<see cref="MarkWritten"/>).</summary>
    public void WritePages(long page, ReadOnlySpan<byte> content)
    {
        long offset = page << QemuFormat.PageShift;
        RandomAccess.Write(_data, content, offset);
        NoteDirty(offset, content.Length);
    }

    // The receiver writes its store at stream speed, hundreds of MB per trip. Left to the
    // kernel, that data is still dirty when the trip ends; the commit's fsync sends it to the
    // device in one burst just as the destination's libvirt fsyncs the domain XML before it
    // resumes the guest, and the guest waits behind both. With PacedWriteback every
    // WritebackChunk written starts its writeback and waits for the chunk before it: at most two
    // chunks are queued, and a device slower than the stream slows the stream, not the switchover.
    // Only the receiver does it: the sender's pages may stay dirty (delayed allocation costs
    // nobody's fsync), while writeback in flight on the source made libvirt's fsync there, also
    // inside the downtime, slower. Lab, one file system per host, 512 MiB guest, first trip,
    // downtime ms: off 514-1185, both sides 248-424, receiver only 109-481 (median ~180; stock ~180).
    public bool PacedWriteback { get; set; }

    private const long WritebackChunk = 8 << 20;
    private Task _deviceFlush = Task.CompletedTask;
    // A write-back error is reported once per open file: whichever call sees it first must make the
    // commit fail, or the commit's own fsync succeeds over pages that never reached the disk.
    private volatile bool _writebackFailed;
    private long _dirtyFrom = long.MaxValue;
    private long _dirtyTo;
    private long _dirtyBytes;
    private long _queuedFrom = -1;
    private long _queuedTo;

    private void NoteDirty(long offset, int length)
    {
        if (!PacedWriteback) return;
        _dirtyFrom = Math.Min(_dirtyFrom, offset);
        _dirtyTo = Math.Max(_dirtyTo, offset + length);
        _dirtyBytes += length;
        if (_dirtyBytes < WritebackChunk) return;
        DurableFile.StartWriteback(_data, _dirtyFrom, _dirtyTo - _dirtyFrom);
        if (_queuedFrom >= 0)
        {
            if (!DurableFile.FinishWriteback(_data, _queuedFrom, _queuedTo - _queuedFrom)) _writebackFailed = true;
            // Written is not yet flushed: the device's volatile cache holds it, and the first cache
            // flush after it pays for all of it. At the switchover that is the destination image's
            // fdatasync behind the mirror's last FLUSH, with the guest paused (lab: 300 ms). So the
            // cache is flushed here as the trip goes, one flush at a time, off the stream's thread;
            // this costs durability nothing and the commit's own fsync nothing but time saved.
            if (_deviceFlush.IsCompleted) _deviceFlush = Task.Run(() =>
            {
                if (!DurableFile.SyncData(_data)) _writebackFailed = true;
            });
        }
        (_queuedFrom, _queuedTo) = (_dirtyFrom, _dirtyTo);
        _dirtyFrom = long.MaxValue;
        _dirtyTo = 0;
        _dirtyBytes = 0;
    }

    /// <summary>Recomputes every page hash from the data file (recovery after a crash).</summary>
    public void Rehash(ulong seed) => HashData(seed, Hashes);

    /// <summary>The index as the last commit wrote it (null when absent or of the wrong length).</summary>
    public UInt128[]? ReadCommittedIndex()
    {
        if (!File.Exists(HashPath)) return null;
        using var hs = new FileStream(HashPath, FileMode.Open, FileAccess.Read);
        if (hs.Length != Hashes.LongLength * 16) return null;
        var index = new UInt128[Hashes.LongLength];
        hs.ReadExactly(MemoryMarshal.AsBytes(index.AsSpan()));
        return index;
    }

    /// <summary>Every page's hash as the data file holds it now, into <paramref name="into"/> (a new array when null).</summary>
    public UInt128[] HashData(ulong seed, UInt128[]? into = null)
    {
        var hashes = into ?? new UInt128[PageCount];
        var buffer = new byte[1 << 20];
        for (long p = 0; p < PageCount;)
        {
            int pages = (int)Math.Min(buffer.Length >> QemuFormat.PageShift, PageCount - p);
            var span = buffer.AsSpan(0, pages << QemuFormat.PageShift);
            int got = 0;
            while (got < span.Length)
            {
                int n = RandomAccess.Read(_data, span[got..], (p << QemuFormat.PageShift) + got);
                if (n == 0) break;
                got += n;
            }
            span[got..].Clear();
            for (int i = 0; i < pages; i++)
                hashes[p + i] = MemoryStore.HashPage(span.Slice(i << QemuFormat.PageShift, QemuFormat.PageSize), seed);
            p += pages;
        }
        return hashes;
    }

    /// <summary>Makes the data and the index durable.</summary>
    public void Persist()
    {
        _deviceFlush.Wait();
        RandomAccess.FlushToDisk(_data);
        if (_writebackFailed) throw new IOException($"{DataPath}: a write-back of the trip's pages failed");
        using var hs = new FileStream(HashPath, FileMode.Create, FileAccess.Write);
        hs.Write(MemoryMarshal.AsBytes(Hashes.AsSpan()));
        hs.Flush(flushToDisk: true);
    }

    public void Dispose()
    {
        // The handle must outlive the background flush that uses it (which reports failure by _writebackFailed, never by throwing).
        _deviceFlush.Wait();
        if (_mapped != null)
        {
            _view!.SafeMemoryMappedViewHandle.ReleasePointer();
            _mapped = null;
        }
        _view?.Dispose();
        _map?.Dispose();
        _data.Dispose();
    }
}
