using System.IO.MemoryMappedFiles;
using System.Runtime.InteropServices;
using BFMig.Transfer.Qemu;

namespace BFMig.Transfer.Store;

/// <summary>
/// One RAMBlock in the store: a sparse, page-addressed data file (mapped) and its page-hash index
/// (in memory while a trip runs, written back at commit). Hash 0 means "unknown".
/// </summary>
internal sealed unsafe class BlockFile : IDisposable
{
    private readonly MemoryMappedFile _map;
    private readonly MemoryMappedViewAccessor _view;
    private readonly byte* _base;
    private bool _disposed;

    public BlockFile(string dataPath, string hashPath, string name, long length, bool loadIndex)
    {
        Name = name;
        Length = length;
        DataPath = dataPath;
        HashPath = hashPath;
        Hashes = new UInt128[length >> QemuFormat.PageShift];
        using (var fs = new FileStream(dataPath, FileMode.OpenOrCreate, FileAccess.ReadWrite, FileShare.Read))
        {
            if (fs.Length != length) fs.SetLength(length);
        }
        _map = MemoryMappedFile.CreateFromFile(dataPath, FileMode.Open, null, length, MemoryMappedFileAccess.ReadWrite);
        _view = _map.CreateViewAccessor(0, length, MemoryMappedFileAccess.ReadWrite);
        byte* p = null;
        _view.SafeMemoryMappedViewHandle.AcquirePointer(ref p);
        _base = p + _view.PointerOffset;
        if (loadIndex && File.Exists(hashPath))
        {
            using var hs = new FileStream(hashPath, FileMode.Open, FileAccess.Read);
            if (hs.Length == Hashes.LongLength * 16)
                hs.ReadExactly(MemoryMarshal.AsBytes(Hashes.AsSpan()));
        }
    }

    public string Name { get; }
    public long Length { get; }
    public string DataPath { get; }
    public string HashPath { get; }
    public UInt128[] Hashes { get; }
    public long PageCount => Hashes.LongLength;

    public Span<byte> Page(long page) => new(_base + (page << QemuFormat.PageShift), QemuFormat.PageSize);

    /// <summary>Recomputes every page hash from the data file (recovery after a crash).</summary>
    public void Rehash(ulong seed)
    {
        for (long p = 0; p < PageCount; p++)
            Hashes[p] = MemoryStore.HashPage(Page(p), seed);
    }

    /// <summary>Makes the data and the index durable.</summary>
    public void Persist()
    {
        _view.Flush();
        using (var fs = new FileStream(DataPath, FileMode.Open, FileAccess.ReadWrite, FileShare.ReadWrite))
            fs.Flush(flushToDisk: true);
        using var hs = new FileStream(HashPath, FileMode.Create, FileAccess.Write);
        hs.Write(MemoryMarshal.AsBytes(Hashes.AsSpan()));
        hs.Flush(flushToDisk: true);
    }

    public void Dispose()
    {
        if (_disposed) return;
        _disposed = true;
        _view.SafeMemoryMappedViewHandle.ReleasePointer();
        _view.Dispose();
        _map.Dispose();
    }
}
