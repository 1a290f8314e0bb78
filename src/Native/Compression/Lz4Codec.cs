namespace BFMig.Native.Compression;

/// <summary>LZ4 block compression through the system liblz4 (stateless, thread-safe).</summary>
public static unsafe class Lz4Codec
{
    /// <summary>Worst-case compressed size of <paramref name="length"/> input bytes.</summary>
    public static int CompressBound(int length) => Interop.Lz4.CompressBound(length);

    /// <summary>Compresses with LZ4_compress_fast; returns the compressed length.</summary>
    /// <exception cref="CompressionException">destination too small.</exception>
    public static int Compress(ReadOnlySpan<byte> source, Span<byte> destination, int acceleration = 1)
    {
        int result;
        fixed (byte* src = source)
        fixed (byte* dst = destination)
        {
            result = Interop.Lz4.CompressFast(src, dst, source.Length, destination.Length, acceleration);
        }
        if (result <= 0)
            throw new CompressionException($"lz4 compress of {source.Length} bytes into {destination.Length} failed");
        return result;
    }

    /// <summary>Decompresses with LZ4_decompress_safe; returns the decompressed length.</summary>
    /// <exception cref="CompressionException">corrupt input or output larger than <paramref name="destination"/>.</exception>
    public static int Decompress(ReadOnlySpan<byte> source, Span<byte> destination)
    {
        int result;
        fixed (byte* src = source)
        fixed (byte* dst = destination)
        {
            result = Interop.Lz4.DecompressSafe(src, dst, source.Length, destination.Length);
        }
        if (result < 0)
            throw new CompressionException($"lz4 decompress of {source.Length} bytes failed (corrupt input at about offset {-result})");
        return result;
    }
}
