using System.Buffers;
using System.Net;
using System.Net.Sockets;
using BFMig.Transfer.Wire;

namespace BFMig.Daemon.Transparent;

/// <summary>
/// Carries a redirected connection to where QEMU aimed it, byte for byte: what a stream BFMig
/// cannot or may not improve gets (stock cost, never a broken migration). bfmigd connects as
/// root, which the redirect rule (QEMU's user only) does not catch.
/// </summary>
public static class DirectForwarder
{
    private const int BufferSize = 256 * 1024;
    private const int SolSocket = 1;
    private const int SoMark = 36;

    /// <summary>
    /// Connects to <paramref name="destination"/> and copies both ways until both directions
    /// ended; an end in one direction is passed on as a half-close, an error closes both.
    /// Owns <paramref name="client"/>. Returns the bytes carried towards the destination, and the
    /// reason it stopped early (null when both sides ended normally).
    /// </summary>
    public static async Task<(long Bytes, string? Error)> RunAsync(Socket client, IPEndPoint destination, TimeSpan connectTimeout, CancellationToken ct)
    {
        using (client)
        {
            using var server = new Socket(destination.AddressFamily, SocketType.Stream, ProtocolType.Tcp) { NoDelay = true };
            client.NoDelay = true;
            // The redirect rule skips marked connections: without the mark this one would come back to us.
            server.SetRawSocketOption(SolSocket, SoMark, BitConverter.GetBytes(RedirectTable.BypassMark));
            try
            {
                using var connect = CancellationTokenSource.CreateLinkedTokenSource(ct);
                connect.CancelAfter(connectTimeout);
                await server.ConnectAsync(destination, connect.Token).ConfigureAwait(false);
            }
            catch (Exception e) when (e is SocketException or OperationCanceledException)
            {
                return (0, $"cannot connect to {destination}: {e.Message}");
            }
            // A carried channel may stay silent for the whole trip (QEMU's post-copy preempt
            // channel): keepalive finds a peer host that vanished, so that no carry holds its slot for ever.
            PeerSockets.KeepAlive(server);
            PeerSockets.KeepAlive(client);
            using var stop = CancellationTokenSource.CreateLinkedTokenSource(ct);
            var up = CopyAsync(client, server, stop);
            var down = CopyAsync(server, client, stop);
            var results = await Task.WhenAll(up, down).ConfigureAwait(false);
            return (results[0].Bytes, results[0].Error ?? results[1].Error);
        }
    }

    private static async Task<(long Bytes, string? Error)> CopyAsync(Socket from, Socket to, CancellationTokenSource stop)
    {
        var buffer = ArrayPool<byte>.Shared.Rent(BufferSize);
        long total = 0;
        try
        {
            while (true)
            {
                int n = await from.ReceiveAsync(buffer, SocketFlags.None, stop.Token).ConfigureAwait(false);
                if (n == 0)
                {
                    // Half-close: the other direction may still have bytes to deliver (QEMU's return path).
                    to.Shutdown(SocketShutdown.Send);
                    return (total, null);
                }
                await to.SendAsync(buffer.AsMemory(0, n), SocketFlags.None, stop.Token).ConfigureAwait(false);
                total += n;
            }
        }
        catch (Exception e) when (e is SocketException or OperationCanceledException or ObjectDisposedException)
        {
            // One side failed: end the other direction too, so neither QEMU waits on a dead half.
            await stop.CancelAsync().ConfigureAwait(false);
            return (total, e is OperationCanceledException ? null : e.Message);
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(buffer);
        }
    }
}
