using BFMig.Transfer.Disk;

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
        _blocks[block].MarkWritten(page);
        long slot = page - _readFirst;
        if (block == _readBlock && slot >= 0 && slot < _readCount) _readValid[slot] = false;
    }

    /// <summary>Records that a page now holds <paramref name="content"/> with hash <paramref name="hash"/> (the main stream, round 0).</summary>
    public void Put(int block, long page, ReadOnlySpan<byte> content, UInt128 hash) => Put(block, page, content, hash, PageWrite.Main(0));

    /// <summary>Records that a page now holds <paramref name="content"/> with hash <paramref name="hash"/>, as <paramref name="write"/> (<see cref="TripWrites"/> orders it).</summary>
    public void Put(int block, long page, ReadOnlySpan<byte> content, UInt128 hash, PageWrite write)
    {
        if (!Admit(block, page, write)) return;
        BeforeModify(block, page);
        var bf = _blocks[block];
        // Written even when the hash is unchanged: equal hashes of different bytes (a collision a
        // guest crafted) must still leave the store holding what was sent.
        var locator = Locator();
        WritePage(block, page, content);
        bf.Hashes[page] = hash;
        // Only the main stream looks for pages by their current content (channels look by the departure's).
        if (hash != ZeroHash && write.Writer == PageWrite.MainWriter) locator?.Insert(hash, block, page);
    }

    /// <summary>
    /// Records that a page holds its content of when the trip began (a multifd channel's elided
    /// page, as <paramref name="write"/>): nothing is written unless the trip had changed the page.
    /// </summary>
    public void PutDeparture(int block, long page, PageWrite write)
    {
        if (!Admit(block, page, write) || _trip is not { } trip || !trip.Modified(block, page)) return;
        var hash = trip.PreservedHash(block, page);
        if (hash == UInt128.Zero)
            throw new InvalidOperationException($"page {page} of block {block} has no departure content to restore");
        trip.ReadPreserved(block, page, _baseScratch);
        WritePage(block, page, _baseScratch);
        _blocks[block].Hashes[page] = hash;
    }

    /// <summary>
    /// Records that the main stream sent a page unchanged (elided) as <paramref name="write"/>: nothing
    /// is written, but a multifd channel's copy from an earlier round no longer replaces it.
    /// </summary>
    public void PutUnchanged(int block, long page, PageWrite write)
    {
        // The main stream elides only what it still sees as its own (MainHash); the decoder refuses the rest.
        if (ChannelWrote(block, page)) throw new InvalidOperationException($"page {page} of block {block} was written by a multifd channel: the main stream cannot keep it unchanged");
        Admit(block, page, write);
    }

    /// <summary>Records that a page is all zero (the main stream, round 0).</summary>
    public void PutZero(int block, long page) => PutZero(block, page, PageWrite.Main(0));

    /// <summary>Records that a page is all zero, as <paramref name="write"/>.</summary>
    public void PutZero(int block, long page, PageWrite write)
    {
        if (!Admit(block, page, write)) return;
        var bf = _blocks[block];
        if (bf.Hashes[page] == ZeroHash) return;
        BeforeModify(block, page);
        // A page of a new data file that nothing wrote reads as zeros already (a hole). Writing
        // zeros there cost a new page-cache page per page: a first trip's unused guest memory
        // (65,536 zero pages in the lab's 512 MiB guest) took ~0.8 s of each helper's CPU on this
        // VM, much of it while the guest was paused.
        if (bf.NeverWritten(page))
        {
            NoteIndexOnly(block, page);
            ZeroPagesUnwritten++;
        }
        else
        {
            WritePage(block, page, ZeroPage);
        }
        bf.Hashes[page] = ZeroHash;
    }

    /// <summary>Zero pages recorded in the index alone, their data file's hole left as it was (statistics).</summary>
    public long ZeroPagesUnwritten { get; private set; }

    /// <summary>Records that a page's content is not known (it will be sent in full next time).</summary>
    public void PutUnknown(int block, long page) => PutUnknown(block, page, PageWrite.Main(0));

    /// <summary>Records that a page's content is not known, as <paramref name="write"/>.</summary>
    public void PutUnknown(int block, long page, PageWrite write)
    {
        if (Admit(block, page, write)) MakeUnknown(block, page);
    }

    private void MakeUnknown(int block, long page)
    {
        var hashes = _blocks[block].Hashes;
        if (hashes[page] == UInt128.Zero) return;
        BeforeModify(block, page);
        hashes[page] = UInt128.Zero;
        NoteIndexOnly(block, page);
    }

    // A page whose index entry changes with no data write (made unknown, or zero over a hole):
    // journaled at the commit, before the index files are rewritten (nothing on disk changes until then).
    private void NoteIndexOnly(int block, long page)
    {
        if (_indexOnlyTouched.Count > 0 && _indexOnlyTouched[^1].Block == block && _indexOnlyTouched[^1].End == page)
            _indexOnlyTouched[^1] = _indexOnlyTouched[^1] with { Count = _indexOnlyTouched[^1].Count + 1 };
        else
            _indexOnlyTouched.Add(new PageRange(block, page, 1));
    }

    // True when the write is to be recorded; a page two writers wrote in one round becomes unknown.
    private bool Admit(int block, long page, PageWrite write)
    {
        if (!_inTrip) throw new InvalidOperationException($"page {page} of block {block} recorded outside a trip");
        if (_trip is not { } trip) return true;
        switch (trip.Admit(block, page, write))
        {
            case TripWrites.Admission.Write:
                return true;
            case TripWrites.Admission.Conflict:
                ConflictPages++;
                MakeUnknown(block, page);
                return false;
            default:
                return false;
        }
    }

    // Before the trip first changes a page's bytes or hash: keeps its departure content, which the
    // multifd channels code against, when it had a known one.
    private void BeforeModify(int block, long page)
    {
        if (_trip is not { } trip || trip.Modified(block, page)) return;
        var hash = _blocks[block].Hashes[page];
        if (hash != UInt128.Zero)
        {
            bool zero = hash == ZeroHash;
            // Read in place through the data file's mapping: every page a trip changes comes this
            // way, and a pread per page here cost a quarter of the sender's CPU (make bench, c2).
            if (!zero) FlushWritesOverlapping(block, page, 1);
            trip.Preserve(block, page, hash, zero, zero ? default : _blocks[block].View(page));
        }
        trip.MarkModified(block, page);
    }

    /// <summary>The page's hash as the main stream may use it: 0 once a multifd channel wrote the page in this trip.</summary>
    public UInt128 MainHash(int block, long page) => ChannelWrote(block, page) ? UInt128.Zero : _blocks[block].Hashes[page];

    /// <summary>True when a multifd channel wrote the page in this trip (the main stream must not use it: the hosts may have recorded it at different moments).</summary>
    public bool ChannelWrote(int block, long page) => _trip is not null && !_trip.MainView(block, page);

    /// <summary>True when no stream recorded the page yet in this trip: it still holds what it held when the trip began.</summary>
    public bool Untouched(int block, long page) => _trip is not { } trip || !trip.Written(block, page);

    /// <summary>
    /// Makes every page no stream recorded in this trip unknown. A trip coded against a receiver's
    /// page index (<see cref="PeerPageIndex"/>) ends with this on the receiver: the sender's store
    /// began empty, so only the pages the trip carried are known on both hosts.
    /// </summary>
    public void ForgetUntouched()
    {
        // No departure copy (BeforeModify): the channels have ended, nothing codes against it any more.
        for (int b = 0; b < _blocks.Count; b++)
        {
            var hashes = _blocks[b].Hashes;
            for (long p = 0; p < hashes.LongLength; p++)
            {
                if (hashes[p] == UInt128.Zero || !Untouched(b, p)) continue;
                hashes[p] = UInt128.Zero;
                NoteIndexOnly(b, p);
            }
        }
    }

    /// <summary>
    /// Vouches for the pages <c>[first, first + macs.Length)</c> of <paramref name="block"/> to a
    /// sender this store is not in step with (outside a trip): each page's MAC under
    /// <paramref name="key"/> (<see cref="PeerPageIndex"/>), or 0 for a page that is unknown, in
    /// doubt, or whose bytes do not hash to its index entry. Such a damaged page joins
    /// <see cref="Doubt"/>, so the trip that follows drops its hash (durably, as its journal begins).
    /// </summary>
    public void Vouch(int block, long first, Span<UInt128> macs, DiskHashKey key, UInt128 zeroMac)
    {
        if (_inTrip) throw new InvalidOperationException("a store vouches for its pages only between trips");
        macs.Clear();
        if (Doubt.Whole) return;
        var buffer = _batch ??= new byte[BatchPages << QemuFormat.PageShift];
        List<PageRange>? damaged = null;
        for (int done = 0; done < macs.Length; done += BatchPages)
        {
            int n = Math.Min(BatchPages, macs.Length - done);
            ReadPages(block, first + done, n, buffer);
            for (int i = 0; i < n; i++)
            {
                long page = first + done + i;
                var hash = GetHash(block, page);
                if (hash == UInt128.Zero) continue;
                var content = buffer.AsSpan(i << QemuFormat.PageShift, QemuFormat.PageSize);
                if (Hash(content) != hash)
                    (damaged ??= []).Add(new PageRange(block, page, 1));
                else
                    macs[done + i] = hash == ZeroHash ? zeroMac : DiskBlockHash.Compute(content, key);
            }
        }
        foreach (var r in Doubt.Ranges)
        {
            if (r.Block != block || r.End <= first || r.First >= first + macs.Length) continue;
            long from = Math.Max(r.First, first), to = Math.Min(r.End, first + macs.Length);
            macs.Slice((int)(from - first), (int)(to - from)).Clear();
        }
        if (damaged is not null)
        {
            TransferLog.Note($"bfmig-transfer: {damaged.Count} retained pages of block {block} are not what the index says: in doubt from now on");
            Doubt = Doubt.Union(MemoryDoubt.Of(damaged));
        }
    }

    private byte[]? _batch;

    /// <summary>The page's hash when the trip began (the departure snapshot; 0 = unknown): what a multifd channel codes against.</summary>
    public UInt128 BaseHash(int block, long page) =>
        _trip is null || !_trip.Modified(block, page) ? _blocks[block].Hashes[page] : _trip.PreservedHash(block, page);

    /// <summary>Reads a page's content when the trip began (only for a page whose <see cref="BaseHash"/> is known).</summary>
    public void ReadBase(int block, long page, Span<byte> destination)
    {
        if (_trip is null || !_trip.Modified(block, page))
            ReadPage(block, page, destination);
        else
            _trip.ReadPreserved(block, page, destination);
    }

    /// <summary>True when a page's content when the trip began is exactly <paramref name="content"/>.</summary>
    public bool BaseEquals(int block, long page, ReadOnlySpan<byte> content)
    {
        if (_trip is null || !_trip.Modified(block, page)) return PageEquals(block, page, content);
        _trip.ReadPreserved(block, page, _baseScratch);
        return content[..QemuFormat.PageSize].SequenceEqual(_baseScratch);
    }

    private readonly byte[] _baseScratch = new byte[QemuFormat.PageSize];

    /// <summary>Pages of this trip that two writers recorded in the same round (made unknown).</summary>
    public long ConflictPages { get; private set; }

    private readonly List<PageRange> _indexOnlyTouched = [];
}
