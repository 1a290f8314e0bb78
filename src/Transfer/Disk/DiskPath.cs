using System.Buffers;
using BFMig.Transfer.Disk.Nbd;
using BFMig.Transfer.Wire;

namespace BFMig.Transfer.Disk;

/// <summary>
/// The nbd kind with stores on both hosts: the source QEMU's mirror goes through
/// <see cref="NbdSenderFilter"/>, which elides what the receiver's retained image already holds,
/// and the receiver watches what reaches its NBD server with <see cref="NbdStreamObserver"/>.
/// When the client names its export, the sender announces the digest of its map of that export
/// (its view of what the receiver holds); elision is on only if the receiver's own map has the
/// same digest. At the end both compare the digests of the maps they recorded; each host saves
/// its map only if the trip ended clean and the digests agree, otherwise the map stays in flux
/// and the next trip sends everything.
/// </summary>
public static class DiskPath
{
    private const int BufferSize = 256 << 10;

    /// <summary>Sender side: runs the filter between the local QEMU and the peer, then confirms the maps.</summary>
    public static async Task SendAsync(LocalConnection qemu, FrameReader reader, FrameWriter writer, TransferOptions o, TransferStats stats, CancellationToken ct)
    {
        var channel = new DiskChannel(new PeerByteTunnel(reader, writer));
        var view = new AgreedDiskView();
        var filter = new NbdSenderFilter(new NbdSenderFilterOptions
        {
            SourceDiskSize = export => o.DiskImages.TryGetValue(export, out var image) ? image.ReadVirtualSize() : null,
        });
        var recorded = new DiskBlockMap(0, DiskMapStore.BlockSize);
        string? mapPath = null;
        DiskBlockMap? peerView = null;
        stats.Mode = "store-full";

        async ValueTask AnnounceAsync(string name, CancellationToken t)
        {
            view.Use(null);
            stats.Export = name;
            mapPath = DiskMapStore.MapPath(o.StoreRoot!, o.Guest, name);
            peerView = DiskMapStore.LoadTrusted(mapPath);
            try
            {
                // The receiver's image is about to change: until this trip is confirmed our view of it is void.
                DiskMapStore.MarkInFlux(mapPath);
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException)
            {
                // Without the marker this host could not keep a map safely: send everything, keep nothing.
                TransferLog.Note($"bfmig-transfer: disk map {mapPath}: {e.Message}; sending everything");
                mapPath = null;
                peerView = null;
            }
            // The map's key continues; without a map this trip starts a new one (both hosts record under it).
            var key = peerView?.HashKey ?? DiskHashKey.NewRandom();
            view.UseKey(key);
            await channel.WriteChunkAsync(DiskChunk.ExportHello, DiskChannel.EncodeExportHello(peerView?.ComputeDigest() ?? UInt128.Zero, key, name), t);
        }

        ValueTask OnControlAsync(DiskChunk type, byte[] payload, CancellationToken t)
        {
            if (type != DiskChunk.ExportReply) throw new PeerProtocolException($"disk channel: unexpected {type} chunk from the receiver");
            var (match, receiverDigest) = DiskChannel.DecodeFlagDigest(payload, "export reply");
            bool agreed = match && peerView is not null && receiverDigest == peerView.ComputeDigest();
            view.Use(agreed ? peerView : null);
            stats.Mode = agreed ? "store-match" : "store-full";
            return ValueTask.CompletedTask;
        }

        var upstream = new SenderUpstream(channel, () => filter.ExportName, AnnounceAsync, OnControlAsync);
        var result = await filter.RunAsync(qemu.Stream, upstream, view, recorded, ct);
        await channel.WriteDataEofAsync(ct);
        stats.StreamBytes = channel.DataBytesWritten;
        stats.ReverseBytes = channel.DataBytesRead;

        bool clean = result.CleanDisconnect && !result.Opaque && !recorded.LastTripUnclean && mapPath is not null;
        var digest = recorded.ComputeDigest();
        await channel.WriteChunkAsync(DiskChunk.End, DiskChannel.EncodeFlagDigest(clean, digest), ct);
        bool committed;
        UInt128 receiverDigest;
        using (var end = CancellationTokenSource.CreateLinkedTokenSource(ct))
        {
            end.CancelAfter(o.EndTimeout);
            (committed, receiverDigest) = DiskChannel.DecodeFlagDigest(await channel.ReadControlAsync(DiskChunk.EndAck, end.Token), "end ack");
            if (clean && committed && receiverDigest == digest)
            {
                // This host's image is the departure snapshot now, but its QEMU still holds it and
                // rewrites its header on the way out: name it here, capture it once QEMU let go.
                recorded.Identity = o.DiskImages.TryGetValue(filter.ExportName ?? "", out var image)
                    ? DiskImageIdentity.PendingCapture(image.Path, image.Format)
                    : null;
                stats.Committed = TrySave(recorded, mapPath!);
                if (stats.Committed)
                    stats.DiskMap = mapPath;
            }
            else
                TransferLog.Note($"bfmig-transfer: disk map of export '{filter.ExportName}' not confirmed (clean {clean}, receiver committed {committed}); the next trip sends everything");
            await channel.Tunnel.ShutdownWriteAsync(end.Token);
            await DrainAsync(channel.Tunnel, end.Token);
        }
        stats.SnapshotComplete = stats.Committed;
    }

    /// <summary>Receiver side: forwards to the local NBD server, observes, and confirms the maps at the end.</summary>
    public static async Task ReceiveAsync(LocalConnection local, FrameReader reader, FrameWriter writer, TransferOptions o, TransferStats stats, CancellationToken ct)
    {
        var channel = new DiskChannel(new PeerByteTunnel(reader, writer));
        var view = new AgreedDiskView();
        var observer = new NbdStreamObserver(view);
        string? mapPath = null;
        string? exportName = null;
        stats.Mode = "store-full";

        async ValueTask OnControlAsync(DiskChunk type, byte[] payload, CancellationToken t)
        {
            if (type != DiskChunk.ExportHello) throw new PeerProtocolException($"disk channel: unexpected {type} chunk from the sender");
            var (senderDigest, senderKey, name) = DiskChannel.DecodeExportHello(payload);
            view.Use(null);
            // What arrives is hashed under the sender's key whatever the match, so that the maps
            // both hosts record of this trip agree.
            view.UseKey(senderKey);
            exportName = name;
            stats.Export = name;
            mapPath = DiskMapStore.MapPath(o.StoreRoot!, o.Guest, name);
            var map = DiskMapStore.LoadTrusted(mapPath);
            if (map is not null && !map.HashKey.Equals(senderKey))
                map = null;
            if (map is not null && DiskMapStore.IdentityMismatch(map, name, o.DiskImages) is { } refused)
            {
                // Only the image itself can say it still holds what the map describes.
                TransferLog.Note($"bfmig-transfer: not using disk map {mapPath}: {refused}; receiving everything");
                stats.DiskMapRefused = refused;
                map = null;
            }
            var mine = map?.ComputeDigest() ?? UInt128.Zero;
            bool match = map is not null && mine == senderDigest;
            // Durable before the option that opens the export (and so any write) reaches the server.
            DiskMapStore.MarkInFlux(mapPath);
            view.Use(match ? map : null);
            stats.Mode = match ? "store-match" : "store-full";
            await channel.WriteChunkAsync(DiskChunk.ExportReply, DiskChannel.EncodeFlagDigest(match, mine), t);
        }

        using var cts = CancellationTokenSource.CreateLinkedTokenSource(ct);
        var fromServer = Task.Run(() => ServerToPeerAsync(local.Stream, channel, observer, cts.Token), CancellationToken.None);
        try
        {
            var buffer = ArrayPool<byte>.Shared.Rent(BufferSize);
            try
            {
                while (true)
                {
                    int n = await channel.ReadDataAsync(buffer.AsMemory(0, BufferSize), OnControlAsync, cts.Token);
                    if (n == 0) break;
                    Observe(observer.OnClientBytes, buffer.AsSpan(0, n));
                    await local.Stream.WriteAsync(buffer.AsMemory(0, n), cts.Token);
                }
            }
            finally
            {
                ArrayPool<byte>.Shared.Return(buffer);
            }
            await local.Stream.FlushAsync(cts.Token);
            local.HalfClose();
            await fromServer.WaitAsync(o.EndTimeout, cts.Token);
        }
        catch
        {
            await cts.CancelAsync();
            try
            {
                await fromServer;
            }
            catch (Exception)
            {
                // The first failure is the one reported.
            }
            throw;
        }
        stats.StreamBytes = channel.DataBytesRead;
        stats.ReverseBytes = channel.DataBytesWritten;

        using var end = CancellationTokenSource.CreateLinkedTokenSource(ct);
        end.CancelAfter(o.EndTimeout);
        var (senderClean, senderDigest) = DiskChannel.DecodeFlagDigest(await channel.ReadControlAsync(DiskChunk.End, end.Token), "end");
        var observed = new DiskBlockMap(0, DiskMapStore.BlockSize);
        observer.Report(observed);
        var digest = observed.ComputeDigest();
        // Saved without an identity: the local QEMU keeps writing this image as the guest runs, so
        // the map is only the peer view (what the sender holds) until this host sends it back.
        bool committed = senderClean && !observed.LastTripUnclean && mapPath is not null && digest == senderDigest && TrySave(observed, mapPath);
        if (committed)
            stats.DiskMap = mapPath;
        if (!committed)
        {
            TransferLog.Note($"bfmig-transfer: disk map of export '{exportName}' left in flux (sender clean {senderClean}, observed clean {!observed.LastTripUnclean}, digests {(digest == senderDigest ? "equal" : "differ")})");
        }
        stats.Committed = committed;
        stats.SnapshotComplete = committed;
        await channel.WriteChunkAsync(DiskChunk.EndAck, DiskChannel.EncodeFlagDigest(committed, digest), end.Token);
        await channel.Tunnel.ShutdownWriteAsync(end.Token);
        await DrainAsync(channel.Tunnel, end.Token);
    }

    // The map becomes trusted only once it is on disk and the marker is gone; a failure leaves it in flux.
    private static bool TrySave(DiskBlockMap map, string path)
    {
        try
        {
            map.Save(path);
            DiskBlockMap.ClearInFlux(path);
            return true;
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            TransferLog.Note($"bfmig-transfer: cannot save disk map {path}: {e.Message}; the next trip sends everything");
            return false;
        }
    }

    private static async Task ServerToPeerAsync(Stream server, DiskChannel channel, NbdStreamObserver observer, CancellationToken ct)
    {
        var buffer = ArrayPool<byte>.Shared.Rent(DiskChannel.MaxPayload);
        try
        {
            while (true)
            {
                int n = await server.ReadAsync(buffer.AsMemory(0, DiskChannel.MaxPayload), ct);
                if (n == 0) break;
                Observe(observer.OnServerBytes, buffer.AsSpan(0, n));
                await channel.WriteDataAsync(buffer.AsMemory(0, n), ct);
            }
            await channel.WriteDataEofAsync(ct);
            await channel.FlushAsync(ct);
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(buffer);
        }
    }

    private delegate void Tap(ReadOnlySpan<byte> data);

    // The observer only decides whether the map can be kept; bytes it cannot follow still reach
    // the server (the sender's filter is the one that refuses a confusing stream). A failed
    // observer stays failed and reports the trip unclean.
    private static void Observe(Tap tap, ReadOnlySpan<byte> data)
    {
        try
        {
            tap(data);
        }
        catch (NbdProtocolException)
        {
        }
    }

    // Reads the peer's remaining tunnel bytes up to its EOF so that neither side closes first.
    private static async Task DrainAsync(PeerByteTunnel tunnel, CancellationToken ct)
    {
        var scratch = new byte[512];
        while (await tunnel.ReadAsync(scratch, ct) != 0)
            throw new PeerProtocolException("disk channel: bytes after the end exchange");
    }

    /// <summary>The filter's upstream: NBD bytes into the disk channel, with the export announced before the option naming it.</summary>
    private sealed class SenderUpstream(DiskChannel channel, Func<string?> exportName, Func<string, CancellationToken, ValueTask> announce,
        Func<DiskChunk, byte[], CancellationToken, ValueTask> onControl) : Stream
    {
        private string? _announced;

        public override bool CanRead => true;
        public override bool CanSeek => false;
        public override bool CanWrite => true;
        public override long Length => throw new NotSupportedException();
        public override long Position { get => throw new NotSupportedException(); set => throw new NotSupportedException(); }

        public override async ValueTask WriteAsync(ReadOnlyMemory<byte> buffer, CancellationToken cancellationToken = default)
        {
            if (exportName() is { } name && name != _announced)
            {
                _announced = name;
                await announce(name, cancellationToken);
            }
            await channel.WriteDataAsync(buffer, cancellationToken);
        }

        public override ValueTask<int> ReadAsync(Memory<byte> buffer, CancellationToken cancellationToken = default) =>
            channel.ReadDataAsync(buffer, onControl, cancellationToken);

        public override Task FlushAsync(CancellationToken cancellationToken) => channel.FlushAsync(cancellationToken);

        public override Task<int> ReadAsync(byte[] buffer, int offset, int count, CancellationToken cancellationToken) =>
            ReadAsync(buffer.AsMemory(offset, count), cancellationToken).AsTask();

        public override Task WriteAsync(byte[] buffer, int offset, int count, CancellationToken cancellationToken) =>
            WriteAsync(buffer.AsMemory(offset, count), cancellationToken).AsTask();

        public override void Flush() => throw new NotSupportedException("asynchronous only");
        public override int Read(byte[] buffer, int offset, int count) => throw new NotSupportedException("asynchronous only");
        public override void Write(byte[] buffer, int offset, int count) => throw new NotSupportedException("asynchronous only");
        public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();
        public override void SetLength(long value) => throw new NotSupportedException();
    }
}
