using System.Buffers;

namespace BFMig.Transfer.Wire;

/// <summary>
/// Copies a local connection to and from a <see cref="PeerByteTunnel"/> (YARP StreamCopier style):
/// pooled buffers, EOF passed on as a half-close, and when one direction fails the other stops.
/// </summary>
public static class TunnelBridge
{
    private const int BufferSize = 256 << 10;

    /// <summary>Runs both directions; <paramref name="prefix"/> (bytes already read from the local side) goes first.</summary>
    public static async Task CopyBothWaysAsync(Stream local, Action? halfCloseLocal, Stream upstream, ReadOnlyMemory<byte> prefix,
        TransferStats? stats, CancellationToken ct)
    {
        using var cts = CancellationTokenSource.CreateLinkedTokenSource(ct);
        var up = Task.Run(async () =>
        {
            try
            {
                if (!prefix.IsEmpty)
                {
                    await upstream.WriteAsync(prefix, cts.Token);
                    if (stats is not null) stats.StreamBytes += prefix.Length;
                }
                await CopyAsync(local, upstream, n => { if (stats is not null) stats.StreamBytes += n; }, cts.Token);
                if (upstream is PeerByteTunnel t) await t.ShutdownWriteAsync(cts.Token);
                else await upstream.FlushAsync(cts.Token);
            }
            catch
            {
                await cts.CancelAsync();
                throw;
            }
        }, cts.Token);
        var down = Task.Run(async () =>
        {
            try
            {
                await CopyAsync(upstream, local, n => { if (stats is not null) stats.ReverseBytes += n; }, cts.Token);
                await local.FlushAsync(cts.Token);
                halfCloseLocal?.Invoke();
            }
            catch
            {
                await cts.CancelAsync();
                throw;
            }
        }, cts.Token);
        try
        {
            await Task.WhenAll(up, down);
        }
        catch (OperationCanceledException) when (!ct.IsCancellationRequested)
        {
            // One direction was cancelled because the other failed: report the failure, not the cancellation.
            var failed = up.IsFaulted ? up : down;
            if (failed.Exception?.InnerException is { } inner) throw inner;
            throw;
        }
    }

    private static async Task CopyAsync(Stream from, Stream to, Action<int> count, CancellationToken ct)
    {
        var buffer = ArrayPool<byte>.Shared.Rent(BufferSize);
        try
        {
            while (true)
            {
                int n = await from.ReadAsync(buffer.AsMemory(0, BufferSize), ct);
                if (n == 0) return;
                await to.WriteAsync(buffer.AsMemory(0, n), ct);
                count(n);
            }
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(buffer);
        }
    }
}
