namespace BFMig.Transfer.Memory;

// Page contents and hashes: reads through a small read-ahead window, writes batched into runs
// of consecutive pages. Trip life cycle, recovery and Commit are in MemoryStore.cs.
public sealed partial class MemoryStore
{
    /// <summary>Page count of block <paramref name="block"/>.</summary>
    public long PageCount(int block) => _blocks[block].PageCount;

    /// <summary>The stored hash of a page (0 = unknown).</summary>
    public UInt128 GetHash(int block, long page) => _blocks[block].Hashes[page];

    /// <summary>The stored content of a page, read into a buffer that the next call reuses.</summary>
    public ReadOnlySpan<byte> Page(int block, long page)
    {
        long slot = page - _readFirst;
        if (block == _readBlock && slot >= 0 && slot < _readCount && _readValid[slot])
        {
            _lastReadBlock = block;
            _lastReadPage = page;
            return _readBuffer.AsSpan((int)slot << QemuFormat.PageShift, QemuFormat.PageSize);
        }
        ReadPage(block, page, _scratch);
        return _scratch;
    }

    /// <summary>True when the stored content of a page is exactly <paramref name="content"/> (compared in place, no copy).</summary>
    public bool PageEquals(int block, long page, ReadOnlySpan<byte> content)
    {
        FlushWritesOverlapping(block, page, 1);
        return _blocks[block].PageEquals(page, content);
    }

    /// <summary>Reads <paramref name="count"/> consecutive stored pages (one system call) into <paramref name="destination"/>.</summary>
    public void ReadPages(int block, long firstPage, int count, Span<byte> destination)
    {
        FlushWritesOverlapping(block, firstPage, count);
        _blocks[block].ReadPages(firstPage, destination[..(count << QemuFormat.PageShift)]);
    }

    /// <summary>Reads the stored content of a page into <paramref name="destination"/>.</summary>
    public void ReadPage(int block, long page, Span<byte> destination)
    {
        bool sequential = block == _lastReadBlock && page == _lastReadPage + 1;
        _lastReadBlock = block;
        _lastReadPage = page;
        long slot = page - _readFirst;
        if (block == _readBlock && slot >= 0 && slot < _readCount && _readValid[slot])
        {
            _readBuffer.AsSpan((int)slot << QemuFormat.PageShift, QemuFormat.PageSize).CopyTo(destination);
            return;
        }
        if (!sequential)
        {
            FlushWritesOverlapping(block, page, 1);
            _blocks[block].Read(page, destination);
            return;
        }
        int count = (int)Math.Min(BatchPages, _blocks[block].PageCount - page);
        FlushWritesOverlapping(block, page, count);
        _blocks[block].ReadPages(page, _readBuffer.AsSpan(0, count << QemuFormat.PageShift));
        _readBlock = block;
        _readFirst = page;
        _readCount = count;
        Array.Fill(_readValid, true, 0, count);
        _readBuffer.AsSpan(0, QemuFormat.PageSize).CopyTo(destination);
    }

    private void FlushWritesOverlapping(int block, long first, int count)
    {
        if (_writeCount > 0 && block == _writeBlock && first < _writeFirst + _writeCount && _writeFirst < first + count) FlushWrites();
    }

    private void FlushWrites()
    {
        if (_writeCount == 0) return;
        _journal?.Touching(_writeBlock, _writeFirst, _writeCount);
        _blocks[_writeBlock].WritePages(_writeFirst, _writeBuffer.AsSpan(0, _writeCount << QemuFormat.PageShift));
        _writeCount = 0;
    }

    private void WritePage(int block, long page, ReadOnlySpan<byte> content)
    {
        if (_writeCount > 0 && (block != _writeBlock || page != _writeFirst + _writeCount || _writeCount == BatchPages)) FlushWrites();
        if (_writeCount == 0)
        {
            _writeBlock = block;
            _writeFirst = page;
        }
        content[..QemuFormat.PageSize].CopyTo(_writeBuffer.AsSpan(_writeCount << QemuFormat.PageShift));
        _writeCount++;
        long slot = page - _readFirst;
        if (block == _readBlock && slot >= 0 && slot < _readCount) _readValid[slot] = false;
    }

    /// <summary>Records that a page now holds <paramref name="content"/> with hash <paramref name="hash"/>.</summary>
    public void Put(int block, long page, ReadOnlySpan<byte> content, UInt128 hash)
    {
        var bf = _blocks[block];
        // Written even when the hash is unchanged: equal hashes of different bytes (a collision a
        // guest crafted) must still leave the store holding what was sent.
        var locator = Locator();
        WritePage(block, page, content);
        bf.Hashes[page] = hash;
        if (hash != ZeroHash) locator?.Insert(hash, block, page);
    }

    /// <summary>Records that a page is all zero.</summary>
    public void PutZero(int block, long page)
    {
        var bf = _blocks[block];
        if (bf.Hashes[page] == ZeroHash) return;
        WritePage(block, page, ZeroPage);
        bf.Hashes[page] = ZeroHash;
    }

    /// <summary>Records that a page's content is not known (it will be sent in full next time).</summary>
    public void PutUnknown(int block, long page)
    {
        var hashes = _blocks[block].Hashes;
        if (hashes[page] == UInt128.Zero) return;
        hashes[page] = UInt128.Zero;
        // Journaled at the commit, before the index files are rewritten (nothing on disk changes until then).
        if (_unknownTouched.Count > 0 && _unknownTouched[^1].Block == block && _unknownTouched[^1].End == page)
            _unknownTouched[^1] = _unknownTouched[^1] with { Count = _unknownTouched[^1].Count + 1 };
        else
            _unknownTouched.Add(new PageRange(block, page, 1));
    }

    private readonly List<PageRange> _unknownTouched = [];
}
