using System.Runtime.InteropServices;

namespace BFMig.Native;

internal static partial class Interop
{
    /// <summary>
    /// The system libnftables (Debian <c>libnftables1</c>): the same library <c>nft</c> uses. A
    /// context owns one netlink socket for its whole life, which is what makes a table created
    /// with <c>flags owner</c> disappear the moment the context (or the process) goes away.
    /// </summary>
    internal static unsafe partial class Nftables
    {
        private const string Lib = "libnftables.so.1";

        /// <summary>NFT_CTX_DEFAULT.</summary>
        internal const uint CtxDefault = 0;

        [LibraryImport(Lib, EntryPoint = "nft_ctx_new")]
        internal static partial nint CtxNew(uint flags);

        [LibraryImport(Lib, EntryPoint = "nft_ctx_free")]
        internal static partial void CtxFree(nint ctx);

        [LibraryImport(Lib, EntryPoint = "nft_ctx_buffer_output")]
        internal static partial int CtxBufferOutput(nint ctx);

        [LibraryImport(Lib, EntryPoint = "nft_ctx_buffer_error")]
        internal static partial int CtxBufferError(nint ctx);

        /// <summary>Borrowed: valid until the next command on the context.</summary>
        [LibraryImport(Lib, EntryPoint = "nft_ctx_get_output_buffer")]
        internal static partial byte* CtxGetOutputBuffer(nint ctx);

        /// <summary>Borrowed: valid until the next command on the context.</summary>
        [LibraryImport(Lib, EntryPoint = "nft_ctx_get_error_buffer")]
        internal static partial byte* CtxGetErrorBuffer(nint ctx);

        [LibraryImport(Lib, EntryPoint = "nft_run_cmd_from_buffer", StringMarshalling = StringMarshalling.Utf8)]
        internal static partial int RunCmdFromBuffer(nint ctx, string buffer);
    }
}
