namespace BFMig.Native.Compression;

/// <summary>
/// zstd block compression through the system libzstd, one compression and one decompression
/// context per instance. Not thread-safe: one instance per stream direction.
/// </summary>
public sealed unsafe class ZstdCodec : IDisposable
{
    private readonly SafeZstdCompressHandle _cctx;
    private readonly SafeZstdDecompressHandle _dctx;

    /// <summary>Creates the contexts; <paramref name="level"/> is a zstd level (1 is fast, negative is faster).</summary>
    public ZstdCodec(int level = 1)
    {
        Level = level;
        _cctx = Interop.Zstd.CreateCCtx();
        _dctx = Interop.Zstd.CreateDCtx();
        if (_cctx.IsInvalid || _dctx.IsInvalid)
        {
            _cctx.Dispose();
            _dctx.Dispose();
            throw new CompressionException("zstd: could not allocate a compression context (out of memory?)");
        }
    }

    /// <summary>The compression level used by <see cref="Compress"/>.</summary>
    public int Level { get; set; }

    /// <summary>Worst-case compressed size of <paramref name="length"/> input bytes.</summary>
    public static int CompressBound(int length) => checked((int)Interop.Zstd.CompressBound((nuint)length));

    /// <summary>Compresses <paramref name="source"/> into <paramref name="destination"/>; returns the compressed length.</summary>
    /// <exception cref="CompressionException">destination too small or a library error.</exception>
    public int Compress(ReadOnlySpan<byte> source, Span<byte> destination)
    {
        nuint result;
        fixed (byte* src = source)
        fixed (byte* dst = destination)
        {
            result = Interop.Zstd.CompressCCtx(_cctx, dst, (nuint)destination.Length, src, (nuint)source.Length, Level);
        }
        if (Interop.Zstd.IsError(result) != 0)
            throw new CompressionException($"zstd compress of {source.Length} bytes failed: {Interop.Zstd.ErrorName(result)}");
        return (int)result;
    }

    /// <summary>Decompresses a whole zstd frame; returns the decompressed length.</summary>
    /// <exception cref="CompressionException">corrupt input or output larger than <paramref name="destination"/>.</exception>
    public int Decompress(ReadOnlySpan<byte> source, Span<byte> destination)
    {
        nuint result;
        fixed (byte* src = source)
        fixed (byte* dst = destination)
        {
            result = Interop.Zstd.DecompressDCtx(_dctx, dst, (nuint)destination.Length, src, (nuint)source.Length);
        }
        if (Interop.Zstd.IsError(result) != 0)
            throw new CompressionException($"zstd decompress of {source.Length} bytes failed: {Interop.Zstd.ErrorName(result)}");
        return (int)result;
    }

    /// <inheritdoc/>
    public void Dispose()
    {
        _cctx.Dispose();
        _dctx.Dispose();
    }
}
