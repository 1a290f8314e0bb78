using System.Numerics;
using System.Runtime.InteropServices;
using System.Runtime.Intrinsics;

namespace BFMig.Transfer.Memory;

/// <summary>
/// Delta of a page against the version the receiver retained, in 8-byte words: pairs of
/// <c>varint equal-words, varint changed-words, changed words</c> until the page's 512 words are
/// covered. Like QEMU's XBZRLE but against the retained store instead of an in-migration cache.
/// </summary>
public static class PageDelta
{
    private const int Words = QemuFormat.PageSize / 8;

    /// <summary>Encodes <paramref name="page"/> against <paramref name="basePage"/>; returns the length, or -1 if it would exceed <paramref name="limit"/>.</summary>
    public static int Encode(ReadOnlySpan<byte> basePage, ReadOnlySpan<byte> page, Span<byte> dst, int limit)
    {
        var a = MemoryMarshal.Cast<byte, ulong>(basePage[..QemuFormat.PageSize]);
        var b = MemoryMarshal.Cast<byte, ulong>(page[..QemuFormat.PageSize]);
        // Every changed word costs 8 bytes: a page that changed too much is known in a vector pass.
        if (ChangedWordsExceed(a, b, limit / 8)) return -1;
        int w = 0;
        int o = 0;
        while (w < Words)
        {
            int same = a[w..].CommonPrefixLength(b[w..]);
            int start = w + same;
            int end = start;
            // A changed run ends at the first two equal words: one equal word is cheaper to resend than to skip.
            int maxEnd = Math.Min(Words, start + ((limit - o - 4) / 8) + 1);
            while (end < maxEnd && (a[end] != b[end] || (end + 1 < Words && a[end + 1] != b[end + 1]))) end++;
            int changed = end - start;
            if (o + 4 + (changed * 8) > limit) return -1;
            o += Varint.Write(dst[o..], (ulong)same);
            o += Varint.Write(dst[o..], (ulong)changed);
            MemoryMarshal.AsBytes(b.Slice(start, changed)).CopyTo(dst[o..]);
            o += changed * 8;
            w = end;
        }
        return o;
    }

    /// <summary>True when more than <paramref name="max"/> of the page's words differ.</summary>
    internal static bool ChangedWordsExceed(ReadOnlySpan<ulong> a, ReadOnlySpan<ulong> b, int max)
    {
        if (!Vector256.IsHardwareAccelerated)
        {
            int n = 0;
            for (int i = 0; i < Words; i++) n += a[i] != b[i] ? 1 : 0;
            return n > max;
        }
        ref ulong ra = ref MemoryMarshal.GetReference(a);
        ref ulong rb = ref MemoryMarshal.GetReference(b);
        int changed = 0;
        for (int i = 0; i < Words; i += 4 * Vector256<ulong>.Count)
        {
            // Four vectors per step: each equal lane is all ones, so a mask bit is set per equal word.
            uint equal = Vector256.Equals(Vector256.LoadUnsafe(ref ra, (nuint)i), Vector256.LoadUnsafe(ref rb, (nuint)i)).ExtractMostSignificantBits()
                | (Vector256.Equals(Vector256.LoadUnsafe(ref ra, (nuint)(i + 4)), Vector256.LoadUnsafe(ref rb, (nuint)(i + 4))).ExtractMostSignificantBits() << 4)
                | (Vector256.Equals(Vector256.LoadUnsafe(ref ra, (nuint)(i + 8)), Vector256.LoadUnsafe(ref rb, (nuint)(i + 8))).ExtractMostSignificantBits() << 8)
                | (Vector256.Equals(Vector256.LoadUnsafe(ref ra, (nuint)(i + 12)), Vector256.LoadUnsafe(ref rb, (nuint)(i + 12))).ExtractMostSignificantBits() << 12);
            changed += 16 - BitOperations.PopCount(equal);
            if (changed > max) return true;
        }
        return false;
    }

    /// <summary>Applies a delta in place to <paramref name="page"/> (which holds the base); returns false if the delta is malformed.</summary>
    public static bool TryApply(ReadOnlySpan<byte> delta, Span<byte> page)
    {
        int pos = 0;
        int w = 0;
        while (w < Words)
        {
            if (!Varint.TryRead(delta, ref pos, out ulong same) || !Varint.TryRead(delta, ref pos, out ulong changed)) return false;
            if (same > (ulong)(Words - w) || changed > (ulong)(Words - w) - same) return false;
            w += (int)same;
            int bytes = (int)changed * 8;
            if (delta.Length - pos < bytes) return false;
            delta.Slice(pos, bytes).CopyTo(page[(w * 8)..]);
            pos += bytes;
            w += (int)changed;
            if (same == 0 && changed == 0) return false;
        }
        return pos == delta.Length;
    }
}
