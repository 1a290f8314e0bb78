using System.Runtime.InteropServices;

namespace BFMig.Native.Netfilter;

/// <summary>A failed nftables command, with the library's own error text.</summary>
public sealed class NftablesException(string message) : Exception(message);

/// <summary>
/// One libnftables context: runs nft command text and keeps its netlink socket open until
/// disposed. Tables this context creates with <c>flags owner</c> belong to that socket, so the
/// kernel deletes them when the context is freed or the process dies, however it dies.
/// Not thread-safe: one owner calls it.
/// </summary>
public sealed class NftContext : IDisposable
{
    private nint _ctx;

    private NftContext(nint ctx) => _ctx = ctx;

    /// <summary>
    /// Opens a context. Throws <see cref="NftablesException"/> when libnftables is missing or the
    /// context cannot be made (it opens its netlink socket lazily: errors then show on the first command).
    /// </summary>
    public static NftContext Open()
    {
        nint ctx;
        try
        {
            ctx = Interop.Nftables.CtxNew(Interop.Nftables.CtxDefault);
        }
        catch (Exception e) when (e is DllNotFoundException or EntryPointNotFoundException)
        {
            throw new NftablesException($"libnftables.so.1 cannot be loaded ({e.Message}); install libnftables1");
        }
        if (ctx == 0)
            throw new NftablesException("nft_ctx_new failed");
        Interop.Nftables.CtxBufferOutput(ctx);
        Interop.Nftables.CtxBufferError(ctx);
        return new NftContext(ctx);
    }

    /// <summary>True when libnftables can be loaded on this host (for checks; does not touch the ruleset).</summary>
    public static bool IsAvailable(out string why)
    {
        try
        {
            using var ctx = Open();
            why = "";
            return true;
        }
        catch (NftablesException e)
        {
            why = e.Message;
            return false;
        }
    }

    /// <summary>Runs nft command text (one transaction per call); returns what nft printed. Throws with nft's error text.</summary>
    public unsafe string Run(string commands)
    {
        ObjectDisposedException.ThrowIf(_ctx == 0, this);
        int rc = Interop.Nftables.RunCmdFromBuffer(_ctx, commands);
        var output = Marshal.PtrToStringUTF8((nint)Interop.Nftables.CtxGetOutputBuffer(_ctx)) ?? "";
        if (rc != 0)
        {
            var error = Marshal.PtrToStringUTF8((nint)Interop.Nftables.CtxGetErrorBuffer(_ctx)) ?? "";
            throw new NftablesException($"nft failed ({rc}): {error.Trim()}");
        }
        return output;
    }

    /// <summary>Frees the context: its netlink socket closes and every owned table goes with it.</summary>
    public void Dispose()
    {
        var ctx = Interlocked.Exchange(ref _ctx, 0);
        if (ctx != 0)
            Interop.Nftables.CtxFree(ctx);
    }
}
