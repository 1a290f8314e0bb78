using System.Runtime.InteropServices;

namespace BFMig.Native;

internal static partial class Interop
{
    /// <summary>The system liblz4 (block API only: frames are ours).</summary>
    internal static unsafe partial class Lz4
    {
        private const string Lib = "liblz4.so.1";

        [LibraryImport(Lib, EntryPoint = "LZ4_compressBound")]
        internal static partial int CompressBound(int inputSize);

        [LibraryImport(Lib, EntryPoint = "LZ4_compress_fast")]
        internal static partial int CompressFast(byte* src, byte* dst, int srcSize, int dstCapacity, int acceleration);

        [LibraryImport(Lib, EntryPoint = "LZ4_decompress_safe")]
        internal static partial int DecompressSafe(byte* src, byte* dst, int compressedSize, int dstCapacity);
    }
}
