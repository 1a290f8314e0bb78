using System.Buffers.Binary;
using System.IO.Hashing;
using System.Runtime.InteropServices;
using System.Text;
using BFMig.Native.Linux;

namespace BFMig.Transfer.Disk;

// File format, version 3, little-endian (version 1 had an XXH3 seed at 24, no key and no
// fingerprint; version 2 had either the key or the fingerprint; such a map is refused as unknown,
// so its disk is sent whole once, never trusted under the old hash or identity):
//   0  8  magic "BFMDMAP\0"
//   8  4  version (1)
//  12  4  flags (bit 0: last trip unclean)
//  16  4  block size
//  20  4  reserved (0)
//  24  8  reserved (0)
//  32  8  image (virtual disk) size
//  40  8  block count = ceil(size / block size)
//  48  8  identity inode
//  56  8  identity file size
//  64  8  identity mtime ticks
//  72  1  identity: 0 none, 1 captured, 2 pending (path and format only, captured later)
//  73  1  format length F (<= 32)
//  74  2  path length P (<= 4096)
//  76 32  block hash key (DiskHashKey)
// 108 16  identity content fingerprint (UInt128 LE, DiskImageIdentity.ReadFingerprint)
// 124  F  format, UTF-8;  then P bytes path, UTF-8
//   ..  ceil(blocks / 64) * 8  known bitmap (u64 words, bit i = block i known)
//   ..  blocks * 16           hashes (UInt128 LE, zero when unknown)
//   .. 16                     XxHash128 (seed 0) of every byte before it
public sealed partial class DiskBlockMap
{
    private static ReadOnlySpan<byte> FileMagic => "BFMDMAP\0"u8;

    /// <summary>Current file format version.</summary>
    public const int FileVersion = 3;

    private const int FixedHeaderLength = 124;
    private const int FingerprintOffset = 108;

    /// <summary>
    /// Saves crash-consistently: writes <c>path.tmp</c>, fsyncs it, renames it over
    /// <paramref name="path"/>. A crash leaves either the old or the new map.
    /// </summary>
    public void Save(string path)
    {
        string tmp = path + ".tmp";
        using (var stream = new FileStream(tmp, FileMode.Create, FileAccess.Write, FileShare.None, 1 << 16))
        {
            var hasher = new XxHash128();
            byte[] header = EncodeHeader();
            Write(stream, hasher, header);
            Write(stream, hasher, MemoryMarshal.AsBytes(_known.AsSpan()));
            var hashBytes = MemoryMarshal.AsBytes(_hashes.AsSpan());
            for (int at = 0; at < hashBytes.Length; at += 1 << 20)
                Write(stream, hasher, hashBytes.Slice(at, Math.Min(1 << 20, hashBytes.Length - at)));
            Span<byte> sum = stackalloc byte[16];
            hasher.GetCurrentHash(sum);
            stream.Write(sum);
            stream.Flush(flushToDisk: true);
        }
        DurableFile.Replace(tmp, path);
    }

    /// <summary>Loads a map; throws <see cref="DiskMapException"/> naming what is wrong and where.</summary>
    public static DiskBlockMap Load(string path)
    {
        using var stream = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read, 1 << 16);
        long fileLength = stream.Length;
        var hasher = new XxHash128();
        Span<byte> fixedHeader = stackalloc byte[FixedHeaderLength];
        ReadExactly(stream, fixedHeader, path, 0, "header");
        hasher.Append(fixedHeader);
        if (!fixedHeader[..8].SequenceEqual(FileMagic))
            throw Bad(path, 0, "magic", Convert.ToHexString(fixedHeader[..8]));
        int version = BinaryPrimitives.ReadInt32LittleEndian(fixedHeader[8..]);
        if (version != FileVersion)
            throw Bad(path, 8, "version", version.ToString(System.Globalization.CultureInfo.InvariantCulture));
        uint flags = BinaryPrimitives.ReadUInt32LittleEndian(fixedHeader[12..]);
        if ((flags & ~1u) != 0)
            throw Bad(path, 12, "flags", $"0x{flags:x}");
        int blockSize = BinaryPrimitives.ReadInt32LittleEndian(fixedHeader[16..]);
        var key = new DiskHashKey(fixedHeader.Slice(76, DiskHashKey.Length));
        ulong imageSize = BinaryPrimitives.ReadUInt64LittleEndian(fixedHeader[32..]);
        long blockCount = BinaryPrimitives.ReadInt64LittleEndian(fixedHeader[40..]);
        if (blockSize < 512 || blockSize > (64 << 20) || !int.IsPow2(blockSize))
            throw Bad(path, 16, "block size", blockSize.ToString(System.Globalization.CultureInfo.InvariantCulture));
        if (imageSize > (ulong)MaxBlockCount * (ulong)blockSize)
            throw Bad(path, 32, "image size", imageSize.ToString(System.Globalization.CultureInfo.InvariantCulture));
        if (blockCount != DiskBlockHash.CountBlocks(imageSize, blockSize))
            throw Bad(path, 40, "block count", $"{blockCount} (size {imageSize} needs {DiskBlockHash.CountBlocks(imageSize, blockSize)})");
        byte identityState = fixedHeader[72];
        if (identityState > 2)
            throw Bad(path, 72, "identity present", identityState.ToString(System.Globalization.CultureInfo.InvariantCulture));
        int formatLength = fixedHeader[73];
        int pathLength = BinaryPrimitives.ReadUInt16LittleEndian(fixedHeader[74..]);
        if (formatLength > DiskImageIdentity.MaxFormatLength)
            throw Bad(path, 73, "format length", formatLength.ToString(System.Globalization.CultureInfo.InvariantCulture));
        if (pathLength > DiskImageIdentity.MaxPathLength)
            throw Bad(path, 74, "path length", pathLength.ToString(System.Globalization.CultureInfo.InvariantCulture));
        long knownBytes = (blockCount + 63) / 64 * 8;
        long expected = FixedHeaderLength + formatLength + pathLength + knownBytes + blockCount * 16 + 16;
        if (fileLength != expected)
            throw Bad(path, 0, "file length", $"{fileLength} (header says {expected})");

        var strings = new byte[formatLength + pathLength];
        ReadExactly(stream, strings, path, FixedHeaderLength, "identity strings");
        hasher.Append(strings);
        var map = new DiskBlockMap(imageSize, blockSize, key) { LastTripUnclean = (flags & 1) != 0 };
        if (identityState != 0)
        {
            map.Identity = new DiskImageIdentity(
                Encoding.UTF8.GetString(strings, formatLength, pathLength),
                BinaryPrimitives.ReadUInt64LittleEndian(fixedHeader[48..]),
                BinaryPrimitives.ReadUInt64LittleEndian(fixedHeader[56..]),
                BinaryPrimitives.ReadInt64LittleEndian(fixedHeader[64..]),
                Encoding.UTF8.GetString(strings, 0, formatLength),
                BinaryPrimitives.ReadUInt128LittleEndian(fixedHeader[FingerprintOffset..])) { IsPending = identityState == 2 };
        }
        long at = FixedHeaderLength + strings.Length;
        var known = MemoryMarshal.AsBytes(map._known.AsSpan());
        ReadExactly(stream, known, path, at, "known bitmap");
        hasher.Append(known);
        at += known.Length;
        var hashes = MemoryMarshal.AsBytes(map._hashes.AsSpan());
        for (int off = 0; off < hashes.Length; off += 1 << 20)
        {
            var part = hashes.Slice(off, Math.Min(1 << 20, hashes.Length - off));
            ReadExactly(stream, part, path, at + off, "hashes");
            hasher.Append(part);
        }
        at += hashes.Length;
        Span<byte> sum = stackalloc byte[16];
        Span<byte> actual = stackalloc byte[16];
        ReadExactly(stream, sum, path, at, "checksum");
        hasher.GetCurrentHash(actual);
        if (!sum.SequenceEqual(actual))
            throw Bad(path, at, "checksum", $"{Convert.ToHexString(sum)} (content hashes to {Convert.ToHexString(actual)})");
        if (blockCount % 64 != 0 && map._known.Length > 0 && (map._known[^1] >> (int)(blockCount % 64)) != 0)
            throw Bad(path, FixedHeaderLength + strings.Length + knownBytes - 8, "known bitmap", "bits set past the last block");
        return map;
    }

    /// <summary>
    /// Loads the map at <paramref name="path"/> only if it can be trusted for
    /// <paramref name="current"/>: present, not in flux, last trip clean, identity equal.
    /// Returns null otherwise (the caller then sends everything).
    /// </summary>
    public static DiskBlockMap? TryLoadValid(string path, DiskImageIdentity current)
    {
        if (!File.Exists(path) || IsInFlux(path))
            return null;
        DiskBlockMap map;
        try
        {
            map = Load(path);
        }
        catch (DiskMapException)
        {
            return null;
        }
        return map.LastTripUnclean || map.Identity != current ? null : map;
    }

    /// <summary>
    /// Captures now the identity of the image a map names with a pending identity (see
    /// <see cref="DiskImageIdentity.IsPending"/>) and saves the map with it. Call only once the
    /// QEMU that last wrote the image has let go of it (after the source QEMU of a migration
    /// stopped) and nothing else wrote it since the map was made. Returns what happened; a map in
    /// flux, unclean, without a pending identity or whose image is gone is left alone.
    /// </summary>
    public static SealResult SealIdentity(string path)
    {
        if (!File.Exists(path))
            return SealResult.NoMap;
        // A journal that names the blocks a failed trip may have written leaves the rest of the
        // map true: the image that trip's QEMU let go of is the one to name now.
        if (DiskDoubtJournal.Read(path).Whole)
            return SealResult.InFlux;
        var map = Load(path);
        if (map.LastTripUnclean)
            return SealResult.Unclean;
        if (map.Identity is not { IsPending: true } pending)
            return SealResult.NotPending;
        if (File.Exists(pending.Path) && !DiskImageIdentity.IsRegularFile(pending.Path))
            return SealResult.NotAFile;
        DiskImageIdentity captured;
        try
        {
            captured = DiskImageIdentity.Capture(pending.Path, pending.Format);
        }
        catch (FileNotFoundException)
        {
            return SealResult.ImageMissing;
        }
        map.Identity = captured;
        map.Save(path);
        return SealResult.Sealed;
    }

    /// <summary>
    /// Durably marks every block of the map at <paramref name="path"/> in doubt: its image was
    /// written by something no journal follows (<see cref="DiskDoubtJournal.DoubtAll"/>).
    /// </summary>
    public static void MarkInFlux(string path) => DiskDoubtJournal.DoubtAll(path);

    /// <summary>Removes the in-flux journal (after the new map was saved).</summary>
    public static void ClearInFlux(string path) => File.Delete(DiskDoubtJournal.PathOf(path));

    /// <summary>True when the map of <paramref name="path"/> has an in-flux journal (some block may be in doubt).</summary>
    public static bool IsInFlux(string path) => DiskDoubtJournal.Exists(path);

    private byte[] EncodeHeader()
    {
        byte[] format = Encoding.UTF8.GetBytes(Identity?.Format ?? "");
        byte[] imagePath = Encoding.UTF8.GetBytes(Identity?.Path ?? "");
        if (format.Length > DiskImageIdentity.MaxFormatLength || imagePath.Length > DiskImageIdentity.MaxPathLength)
            throw new InvalidOperationException("image identity format or path too long to store");
        var header = new byte[FixedHeaderLength + format.Length + imagePath.Length];
        var span = header.AsSpan();
        FileMagic.CopyTo(span);
        BinaryPrimitives.WriteInt32LittleEndian(span[8..], FileVersion);
        BinaryPrimitives.WriteUInt32LittleEndian(span[12..], LastTripUnclean ? 1u : 0u);
        BinaryPrimitives.WriteInt32LittleEndian(span[16..], BlockSize);
        HashKey.CopyTo(span.Slice(76, DiskHashKey.Length));
        BinaryPrimitives.WriteUInt64LittleEndian(span[32..], ImageSize);
        BinaryPrimitives.WriteInt64LittleEndian(span[40..], BlockCount);
        BinaryPrimitives.WriteUInt64LittleEndian(span[48..], Identity?.Inode ?? 0);
        BinaryPrimitives.WriteUInt64LittleEndian(span[56..], Identity?.Size ?? 0);
        BinaryPrimitives.WriteInt64LittleEndian(span[64..], Identity?.MtimeTicks ?? 0);
        span[72] = Identity is null ? (byte)0 : Identity.IsPending ? (byte)2 : (byte)1;
        span[73] = (byte)format.Length;
        BinaryPrimitives.WriteUInt16LittleEndian(span[74..], (ushort)imagePath.Length);
        BinaryPrimitives.WriteUInt128LittleEndian(span[FingerprintOffset..], Identity?.Fingerprint ?? default);
        format.CopyTo(span[FixedHeaderLength..]);
        imagePath.CopyTo(span[(FixedHeaderLength + format.Length)..]);
        return header;
    }

    private static void Write(Stream stream, XxHash128 hasher, ReadOnlySpan<byte> bytes)
    {
        hasher.Append(bytes);
        stream.Write(bytes);
    }

    private static void ReadExactly(Stream stream, Span<byte> destination, string path, long offset, string field)
    {
        try
        {
            stream.ReadExactly(destination);
        }
        catch (EndOfStreamException e)
        {
            throw new DiskMapException($"disk map {path} at byte {offset}: truncated in {field}", e);
        }
    }

    private static DiskMapException Bad(string path, long offset, string field, string value) =>
        new($"disk map {path} at byte {offset}: bad {field} {value}");
}
