using Microsoft.Win32.SafeHandles;

namespace BFMig.Native.Compression;

/// <summary>A ZSTD_CCtx, freed with ZSTD_freeCCtx.</summary>
internal sealed class SafeZstdCompressHandle : SafeHandleZeroOrMinusOneIsInvalid
{
    public SafeZstdCompressHandle() : base(ownsHandle: true) { }

    protected override bool ReleaseHandle()
    {
        Interop.Zstd.FreeCCtx(handle);
        return true;
    }
}

/// <summary>A ZSTD_DCtx, freed with ZSTD_freeDCtx.</summary>
internal sealed class SafeZstdDecompressHandle : SafeHandleZeroOrMinusOneIsInvalid
{
    public SafeZstdDecompressHandle() : base(ownsHandle: true) { }

    protected override bool ReleaseHandle()
    {
        Interop.Zstd.FreeDCtx(handle);
        return true;
    }
}
