using Microsoft.Win32.SafeHandles;

namespace BFMig.Transfer.Memory;

/// <summary>
/// What one trip wrote into a <see cref="MemoryStore"/>, so that the main stream and its multifd
/// channels leave both hosts' stores identical whatever order their writes arrive in:
/// <list type="bullet">
/// <item><b>Order by round.</b> Each page remembers the round and writer of its latest write. A
/// later round wins, an earlier one is dropped, the same writer in the same round wins (its own
/// stream is ordered), and two writers in the same round make the page unknown for good in that
/// round. None of these outcomes depends on the order the writes came in.</item>
/// <item><b>The departure snapshot stays readable.</b> Channels code their pages against the
/// store as it was when the trip began (<see cref="MemoryStore.BaseHash"/>), never against what
/// the trip wrote, so a channel's op means the same on both hosts. Before a page with a known,
/// non-zero retained hash is modified for the first time in the trip, its bytes are copied
/// into a scratch file (<c>mem/trip-base</c>); a trip that changes little copies little.</item>
/// </list>
/// The scratch file is not needed after the trip and never for crash recovery (the journal puts
/// every page the trip may have written in doubt); the store deletes it when the trip ends and
/// when it opens.
/// </summary>
internal sealed class TripWrites : IDisposable
{
    /// <summary>Scratch file of the departure snapshot's overwritten pages.</summary>
    public const string FileName = "trip-base";

    // A page's tag: bit 31 set once the trip changed the page's bytes or hash (its departure
    // content is then in the scratch file, if it had any worth keeping); bits 9-30 the round and
    // bits 0-8 the writer of its latest admitted write (0: none yet).
    private const int WriterBits = 9;
    private const uint WriterMask = (1u << WriterBits) - 1;
    private const uint Conflict = WriterMask;
    private const uint ModifiedBit = 1u << 31;
    private const uint RoundMask = ~ModifiedBit & ~WriterMask;
    private const long MaxRound = (long)(RoundMask >> WriterBits);

    private readonly string _path;
    private readonly uint[]?[] _tags;
    private readonly long[] _pageCounts;
    private readonly Dictionary<long, (long Slot, UInt128 Hash)> _base = [];
    // Departure copies go to the scratch file PendingPages at a time (one pwrite instead of one
    // per page); the newest, not yet written, are read from _pending.
    private const int PendingPages = 64;
    private byte[]? _pending;
    private long _written;
    private SafeFileHandle? _file;
    private long _slots;
    private bool _disposed;

    public TripWrites(string directory, IReadOnlyList<long> pageCounts)
    {
        _path = Path.Combine(directory, FileName);
        _pageCounts = [.. pageCounts];
        _tags = new uint[]?[pageCounts.Count];
        File.Delete(_path);
    }

    /// <summary>What the store does with a write (<see cref="Admit"/>).</summary>
    public enum Admission
    {
        /// <summary>Record it.</summary>
        Write,
        /// <summary>A later round already holds the page: leave it.</summary>
        Skip,
        /// <summary>Another writer wrote the page in the same round: it becomes unknown.</summary>
        Conflict,
    }

    /// <summary>True once the trip changed the page's bytes or hash (<see cref="MarkModified"/>).</summary>
    public bool Modified(int block, long page) => _tags[block] is { } t && (t[page] & ModifiedBit) != 0;

    /// <summary>Records that the page's bytes or hash are about to change (its departure content kept first: <see cref="Preserve"/>).</summary>
    public void MarkModified(int block, long page) => (_tags[block] ??= new uint[_pageCounts[block]])[page] |= ModifiedBit;

    /// <summary>True once any writer recorded the page in this trip (even unchanged, or unknown).</summary>
    public bool Written(int block, long page) => _tags[block] is { } t && (t[page] & WriterMask) != 0;

    /// <summary>True when the page is as the main stream last saw it: no write yet, or the latest by the main stream.</summary>
    public bool MainView(int block, long page)
    {
        if (_tags[block] is not { } t) return true;
        uint writer = t[page] & WriterMask;
        return writer == 0 || writer == PageWrite.MainWriter;
    }

    /// <summary>Decides a write by round and writer, and records it as the page's latest.</summary>
    public Admission Admit(int block, long page, PageWrite write)
    {
        if (write.Writer is < PageWrite.MainWriter or >= (int)Conflict) throw new ArgumentOutOfRangeException(nameof(write), $"writer {write.Writer}");
        var tags = _tags[block] ??= new uint[_pageCounts[block]];
        uint tag = tags[page];
        uint modified = tag & ModifiedBit;
        uint round = (uint)Math.Clamp(write.Round, 0, MaxRound);
        uint writer = (uint)write.Writer & WriterMask;
        uint next = modified | (round << WriterBits) | writer;
        uint lastWriter = tag & WriterMask;
        if (lastWriter == 0)
        {
            tags[page] = next;
            return Admission.Write;
        }
        uint lastRound = (tag & RoundMask) >> WriterBits;
        if (round > lastRound)
        {
            tags[page] = next;
            return Admission.Write;
        }
        if (round < lastRound || lastWriter == Conflict) return Admission.Skip;
        if (lastWriter == writer) return Admission.Write;
        tags[page] = modified | (round << WriterBits) | Conflict;
        return Admission.Conflict;
    }

    /// <summary>Keeps the departure content of a page about to be modified for the first time (zero pages need no copy).</summary>
    public void Preserve(int block, long page, UInt128 hash, bool zero, ReadOnlySpan<byte> content)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        long key = Key(block, page);
        if (_base.ContainsKey(key)) return;
        if (zero)
        {
            _base[key] = (-1, hash);
            return;
        }
        _pending ??= new byte[PendingPages << QemuFormat.PageShift];
        // Written before the buffer is filled again, and the page recorded only once its copy is
        // held: a scratch write that failed (disk full) fails again here, by its own error.
        if (_slots - _written == PendingPages) WritePending();
        long slot = _slots;
        content[..QemuFormat.PageSize].CopyTo(_pending.AsSpan(PendingOffset(slot)));
        _slots++;
        _base[key] = (slot, hash);
    }

    private int PendingOffset(long slot) => (int)(slot - _written) << QemuFormat.PageShift;

    private void WritePending()
    {
        _file ??= File.OpenHandle(_path, FileMode.CreateNew, FileAccess.ReadWrite, FileShare.None);
        RandomAccess.Write(_file, _pending.AsSpan(0, PendingOffset(_slots)), _written << QemuFormat.PageShift);
        _written = _slots;
    }

    /// <summary>The departure hash of a page the trip modified (0: it had none worth keeping).</summary>
    public UInt128 PreservedHash(int block, long page) => _base.TryGetValue(Key(block, page), out var b) ? b.Hash : UInt128.Zero;

    /// <summary>Reads the departure content of a modified page that <see cref="PreservedHash"/> knows.</summary>
    public void ReadPreserved(int block, long page, Span<byte> destination)
    {
        var (slot, _) = _base[Key(block, page)];
        if (slot < 0)
        {
            destination[..QemuFormat.PageSize].Clear();
            return;
        }
        if (slot >= _written)
        {
            _pending.AsSpan(PendingOffset(slot), QemuFormat.PageSize).CopyTo(destination);
            return;
        }
        int n = RandomAccess.Read(_file!, destination[..QemuFormat.PageSize], slot << QemuFormat.PageShift);
        if (n != QemuFormat.PageSize) throw new IOException($"{_path}: short read of slot {slot}");
    }

    private static long Key(int block, long page) => ((long)block << 40) | page;

    /// <summary>Closes and deletes the scratch file.</summary>
    public void Dispose()
    {
        _disposed = true;
        _file?.Dispose();
        _file = null;
        try
        {
            File.Delete(_path);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            // Deleted again when the store next opens or begins a trip.
        }
    }
}
