using System.Runtime.InteropServices;
using BFMig.Native.Compression;

namespace BFMig.Native;

internal static partial class Interop
{
    /// <summary>The system libzstd (the same library QEMU links against).</summary>
    internal static unsafe partial class Zstd
    {
        private const string Lib = "libzstd.so.1";

        [LibraryImport(Lib, EntryPoint = "ZSTD_compressBound")]
        internal static partial nuint CompressBound(nuint srcSize);

        [LibraryImport(Lib, EntryPoint = "ZSTD_createCCtx")]
        internal static partial SafeZstdCompressHandle CreateCCtx();

        [LibraryImport(Lib, EntryPoint = "ZSTD_freeCCtx")]
        internal static partial nuint FreeCCtx(nint cctx);

        [LibraryImport(Lib, EntryPoint = "ZSTD_compressCCtx")]
        internal static partial nuint CompressCCtx(SafeZstdCompressHandle cctx, byte* dst, nuint dstCapacity, byte* src, nuint srcSize, int compressionLevel);

        [LibraryImport(Lib, EntryPoint = "ZSTD_createDCtx")]
        internal static partial SafeZstdDecompressHandle CreateDCtx();

        [LibraryImport(Lib, EntryPoint = "ZSTD_freeDCtx")]
        internal static partial nuint FreeDCtx(nint dctx);

        [LibraryImport(Lib, EntryPoint = "ZSTD_decompressDCtx")]
        internal static partial nuint DecompressDCtx(SafeZstdDecompressHandle dctx, byte* dst, nuint dstCapacity, byte* src, nuint srcSize);

        [LibraryImport(Lib, EntryPoint = "ZSTD_isError")]
        internal static partial uint IsError(nuint code);

        [LibraryImport(Lib, EntryPoint = "ZSTD_getErrorName")]
        internal static partial byte* GetErrorName(nuint code);

        /// <summary>The library's own description of an error code (a static string, not ours to free).</summary>
        internal static string ErrorName(nuint code) => Marshal.PtrToStringUTF8((nint)GetErrorName(code)) ?? "unknown zstd error";
    }
}
