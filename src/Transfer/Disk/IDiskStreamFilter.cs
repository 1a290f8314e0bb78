using BFMig.Transfer.Wire;


namespace BFMig.Transfer.Disk;

/// <summary>
/// The seam for the disk (NBD) stream: a filter sits between the source QEMU's NBD client and the
/// tunnel to the peer, answering what it can locally and forwarding the rest. It returns when the
/// client has disconnected and every reply has been delivered; it sends EOF upstream with
/// <see cref="PeerByteTunnel.ShutdownWriteAsync"/> when the upstream is a tunnel.
/// </summary>
public interface IDiskStreamFilter
{
    /// <summary>Runs the filter until both directions end; throws if either side fails.</summary>
    Task RunAsync(Stream qemuClient, Stream upstream, CancellationToken ct);
}

/// <summary>
/// The disk stream without stores on both hosts: a plain (compressed) byte tunnel in both
/// directions, without an idle timeout (a mirror that reached ready is idle until the memory
/// stream ends).
/// </summary>
public sealed class PlainDiskStreamFilter : IDiskStreamFilter
{
    public Task RunAsync(Stream qemuClient, Stream upstream, CancellationToken ct) =>
        TunnelBridge.CopyBothWaysAsync(qemuClient, () => (qemuClient as System.Net.Sockets.NetworkStream)?.Socket.Shutdown(System.Net.Sockets.SocketShutdown.Send), upstream, ReadOnlyMemory<byte>.Empty, stats: null, Timeout.InfiniteTimeSpan, ct);
}
