using System.Buffers;
using System.Net.Sockets;
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
/// its map only if the trip ended clean and the digests agree. Otherwise each keeps its saved map
/// and a journal of the blocks the trip may have written (<see cref="DiskDoubtJournal"/>); the
/// next trip's hello exchanges both journals, and both hosts use the saved map minus what either
/// doubts, if that proves equal (digest).
/// </summary>
public static class DiskPath
{
    private const int BufferSize = 256 << 10;

    /// <summary>Sender side: runs the filter between the local QEMU and the peer, then confirms the maps.</summary>
    public static async Task SendAsync(LocalConnection qemu, FrameReader reader, FrameWriter writer, TransferOptions o, TransferStats stats, CancellationToken ct)
    {
        var channel = new DiskChannel(new PeerByteTunnel(reader, writer));
        var view = new AgreedDiskView();
        DiskDoubtJournal? journal = null;
        var filter = new NbdSenderFilter(new NbdSenderFilterOptions
        {
            SourceDiskSize = export => o.DiskImages.TryGetValue(export, out var image) ? image.ReadVirtualSize(o.QemuUser) : null,
            Touching = (offset, length) => journal?.Touching(offset, length),
        });
        var recorded = new DiskBlockMap(0, DiskMapStore.BlockSize);
        string? mapPath = null;
        DiskBlockMap? saved = null;
        var savedDoubt = DiskDoubt.All;
        DiskHashKey? announcedKey = null;
        DiskMapOffer? offer = null;
        bool awaitingReply = false;
        ulong? offerSize = null;
        stats.Mode = "store-full";

        async ValueTask AnnounceAsync(string name, CancellationToken t)
        {
            view.Use(null);
            offer = null;
            awaitingReply = true;
            offerSize = o.DiskImages.TryGetValue(name, out var source) ? source.ReadVirtualSize(o.QemuUser) : null;
            stats.Export = name;
            mapPath = DiskMapStore.MapPath(o.StoreRoot!, o.Guest, name);
            string? why;
            (saved, savedDoubt, why) = DiskMapStore.LoadRetained(mapPath);
            try
            {
                // The receiver's image is about to change: from now on our view of it holds only outside the journal.
                journal?.Dispose();
                journal = DiskDoubtJournal.Begin(mapPath, DiskMapStore.BlockSize, saved is null ? DiskDoubt.All : savedDoubt);
                if (journal.Lost is { } lost)
                    (why, mapPath, saved) = (lost, null, null);
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException)
            {
                // Without the journal this host could not keep a map safely: send everything, keep nothing.
                why = $"cannot journal {mapPath}: {e.Message}";
                mapPath = null;
                saved = null;
                journal = null;
            }
            if (why is not null)
                MapUnused(stats, name, why);
            // The map's key continues; without a map this trip starts a new one (both hosts record under it).
            var key = saved?.HashKey ?? DiskHashKey.NewRandom();
            announcedKey = key;
            view.UseKey(key);
            await channel.WriteChunkAsync(DiskChunk.ExportHello, DiskChannel.EncodeExportHello(saved?.ComputeDigest() ?? UInt128.Zero, key, name, saved is null ? DiskDoubt.All : savedDoubt), t);
        }

        ValueTask OnControlAsync(DiskChunk type, byte[] payload, CancellationToken t)
        {
            if (type == DiskChunk.ExportMap && awaitingReply)
            {
                (offer ??= new DiskMapOffer(offerSize)).Add(payload);
                return ValueTask.CompletedTask;
            }
            if (type != DiskChunk.ExportReply) throw new PeerProtocolException($"disk channel: unexpected {type} chunk from the receiver");
            awaitingReply = false;
            var (match, receiverDigest, receiverDoubt) = DiskChannel.DecodeExportReply(payload);
            // Both hosts drop what either may have written since the saved map: the rest is proven equal by the digest.
            var inDoubt = savedDoubt.Union(receiverDoubt);
            var agreed = match && saved is not null ? inDoubt.Apply(saved) : null;
            bool usable = agreed is not null && receiverDigest == agreed.ComputeDigest();
            if (!usable && match && saved is not null && receiverDoubt.Apply(saved) is { } proven && receiverDigest == proven.ComputeDigest())
            {
                // The receiver re-hashed its image: its doubt is exactly what differs there, and
                // what this host may have forwarded into it adds nothing (the image is its own).
                (inDoubt, agreed, usable) = (receiverDoubt, proven, true);
            }
            // Not in step, but the receiver offered its own map (a host this one never exchanged the guest with).
            var offered = !usable && !match ? offer?.Complete(announcedKey!) : null;
            string? offerUnused = offer?.Unusable;
            offer = null;
            // The reply's digest shows that every chunk arrived as the receiver meant it (the receiver vouches for the map itself).
            if (offered is not null && offered.ComputeDigest() != receiverDigest)
                throw new PeerProtocolException("disk channel: the receiver's offered map does not have the digest its reply names");
            view.Use(usable ? agreed : offered);
            stats.Mode = usable ? "store-match" : offered is not null ? "store-index" : "store-full";
            if (usable)
                stats.DiskDoubtBlocks = inDoubt.BlockCount;
            else if (offered is not null)
                TransferLog.Note($"bfmig-transfer: disk map of export '{filter.ExportName}': not in step with the receiver, using the map it offered ({offered.KnownCount} of {offered.BlockCount} blocks known)");
            else if (offerUnused is not null)
                MapUnused(stats, filter.ExportName ?? "", offerUnused);
            else if (saved is not null)
                MapUnused(stats, filter.ExportName ?? "", !match ? "the receiver's map differs from this host's view of it (or the receiver has none it trusts)"
                    : agreed is null ? "every block is in doubt after the hosts' interrupted trips"
                    : "the receiver's map minus both hosts' doubt differs from this host's");
            return ValueTask.CompletedTask;
        }

        var upstream = new SenderUpstream(channel, () => filter.ExportName, AnnounceAsync, OnControlAsync);
        bool settled = false;
        try
        {
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
                    stats.Committed = TrySave(recorded, mapPath!, journal!);
                    settled = stats.Committed;
                    if (stats.Committed)
                        stats.DiskMap = mapPath;
                }
                else
                {
                    TransferLog.Note($"bfmig-transfer: disk map of export '{filter.ExportName}' not confirmed (clean {clean}, receiver committed {committed}); the next trip sends everything");
                    if (clean && committed)
                    {
                        // Both sides think the trip went well but disagree on what it left: trust nothing of it.
                        TryDoubtEverything(journal);
                        settled = true;
                    }
                }
                await channel.Tunnel.ShutdownWriteAsync(end.Token);
                await DrainAsync(channel.Tunnel, end.Token);
            }
            stats.SnapshotComplete = stats.Committed;
            if (filter.ExportName is not null && !result.CleanDisconnect && !result.Opaque)
                throw new StreamCutException("the source QEMU's mirror left the NBD connection without NBD_CMD_DISC: the migration was cancelled or failed");
        }
        finally
        {
            if (!settled)
                stats.DiskDoubtAfter = Settle(journal);
            journal?.Dispose();
        }
    }

    /// <summary>Receiver side: forwards to the local NBD server, observes, and confirms the maps at the end.</summary>
    public static async Task ReceiveAsync(LocalConnection local, FrameReader reader, FrameWriter writer, TransferOptions o, TransferStats stats, CancellationToken ct)
    {
        var channel = new DiskChannel(new PeerByteTunnel(reader, writer));
        var view = new AgreedDiskView();
        DiskDoubtJournal? journal = null;
        var observer = new NbdStreamObserver(view) { Touching = (offset, length) => journal?.Touching(offset, length) };
        string? mapPath = null;
        string? exportName = null;
        stats.Mode = "store-full";

        async ValueTask OnControlAsync(DiskChunk type, byte[] payload, CancellationToken t)
        {
            if (type != DiskChunk.ExportHello) throw new PeerProtocolException($"disk channel: unexpected {type} chunk from the sender");
            var (senderDigest, senderKey, name, senderDoubt) = DiskChannel.DecodeExportHello(payload);
            view.Use(null);
            // What arrives is hashed under the sender's key whatever the match, so that the maps
            // both hosts record of this trip agree.
            view.UseKey(senderKey);
            exportName = name;
            stats.Export = name;
            mapPath = DiskMapStore.MapPath(o.StoreRoot!, o.Guest, name);
            var (saved, doubt, why) = DiskMapStore.LoadRetained(mapPath);
            // A map wholly in doubt (its image written outside any journaled trip: a guest started
            // here while away) may still be proven block by block; nothing else can say which.
            bool wholly = false;
            if (saved is null && doubt.Whole && DiskMapStore.LoadSound(mapPath) is { } doubted)
                (saved, wholly) = (doubted, true);
            if (saved is not null && !saved.HashKey.Equals(senderKey))
                (saved, why, wholly) = (null, "the sender hashes under another key (its map is not this one's peer)", false);
            bool rehashed = false;
            if (saved is not null && (wholly ? why : DiskMapStore.IdentityMismatch(saved, name, o.DiskImages)) is { } refused)
            {
                // Only the image itself can say it still holds what the map describes: its identity
                // could not, so its content must, block by block.
                var proof = await RehashAsync(saved, name, refused, o, stats, t);
                if (proof is null)
                {
                    if (!wholly)
                        stats.DiskMapRefused = refused;
                    (saved, why) = (null, refused);
                }
                else
                {
                    // A block that differs is in doubt like one a failed trip wrote: both hosts drop
                    // it. Every other block was read and holds what the map says, whatever a journal
                    // (this host's or the sender's, coarse after a crash) feared: the doubt is exact.
                    doubt = proof.Differing;
                    rehashed = true;
                }
            }
            if (saved is not null && (rehashed || saved.Identity is { IsPending: false }) && o.DiskImages.TryGetValue(name, out var image))
            {
                // The image was just proven to hold what the map describes (outside the doubt), and
                // this trip writes it: should the trip not commit, bfmigd names it again once its
                // QEMU let go (SealIdentity; a block device stays pending and is re-hashed again).
                var proven = saved.Identity;
                saved.Identity = DiskImageIdentity.PendingCapture(image.Path, image.Format);
                try
                {
                    saved.Save(mapPath);
                }
                catch (Exception e) when (e is IOException or UnauthorizedAccessException)
                {
                    (saved, why) = (null, DiskDoubtJournal.RemoveMap(mapPath, e));
                }
                if (saved is not null)
                    saved.Identity = proven;
            }
            // Durable before the option that opens the export (and so any write) reaches the server.
            journal?.Dispose();
            journal = DiskDoubtJournal.Begin(mapPath, DiskMapStore.BlockSize, saved is null ? DiskDoubt.All : doubt);
            if (journal.Lost is { } lost)
                (saved, why, mapPath) = (null, lost, null);
            bool match = saved is not null && saved.ComputeDigest() == senderDigest;
            // After a re-hash only this host's exact doubt counts (the sender accepts it: see its ExportReply).
            var inDoubt = rehashed ? doubt : senderDoubt.Union(doubt);
            var agreed = match ? inDoubt.Apply(saved!) : null;
            // The sender's view is of another host's image (the guest was elsewhere since it left
            // here): this host still holds what its own map says, minus its own doubt, and offers that.
            bool offered = false;
            if (!match && saved is not null && doubt.Apply(saved) is { } own)
                (agreed, inDoubt, offered) = (own, doubt, true);
            if (saved is not null && agreed is null)
                why = match ? "every block is in doubt after the hosts' interrupted trips" : "every block of this host's map is in doubt";
            if (why is not null)
                MapUnused(stats, name, why);
            else
                stats.DiskDoubtBlocks = inDoubt.BlockCount;
            view.Use(agreed);
            stats.Mode = offered ? "store-index" : agreed is not null ? "store-match" : "store-full";
            if (offered)
            {
                TransferLog.Note($"bfmig-transfer: disk map of export '{name}': the sender's view is of another host's image; offering this host's own ({agreed!.KnownCount} of {agreed.BlockCount} blocks known)");
                foreach (var chunk in DiskMapOffer.Encode(agreed))
                    await channel.WriteChunkAsync(DiskChunk.ExportMap, chunk, t);
            }
            await channel.WriteChunkAsync(DiskChunk.ExportReply, DiskChannel.EncodeExportReply(match, agreed?.ComputeDigest() ?? UInt128.Zero, saved is null ? DiskDoubt.All : doubt), t);
        }

        bool settled = false;
        try
        {
            using var cts = CancellationTokenSource.CreateLinkedTokenSource(ct);
            var server = new ServerSide();
            var fromServer = Task.Run(() => ServerToPeerAsync(local.Stream, channel, observer, server, cts.Token), CancellationToken.None);
            // A server that ends before the client's NBD_CMD_DISC is a destination QEMU that went
            // away (a failed or cancelled migration). Nothing the source sends can land any more,
            // and the source QEMU's mirror may be waiting for replies to requests in flight: its
            // cancel, and so libvirt's failure, would wait on us until the idle timeout. End now.
            _ = fromServer.ContinueWith(_ =>
            {
                if (server.EndedEarly(observer) is null)
                    return;
                try
                {
                    cts.Cancel();
                }
                catch (ObjectDisposedException)
                {
                    // The trip already ended.
                }
            }, CancellationToken.None, TaskContinuationOptions.ExecuteSynchronously, TaskScheduler.Default);
            try
            {
                var buffer = ArrayPool<byte>.Shared.Rent(BufferSize);
                try
                {
                    while (true)
                    {
                        int n = await channel.ReadDataAsync(buffer.AsMemory(0, BufferSize), OnControlAsync, cts.Token);
                        if (n == 0)
                        {
                            // The source's side ended (cancelled without DISC, or done): the server
                            // closing after that is the answer, not a destination that went away.
                            server.ClientEnded = true;
                            break;
                        }
                        if (!Observe(observer.OnClientBytes, buffer.AsSpan(0, n)) && journal is not null)
                        {
                            // The journal follows writes through the observer: once it is lost, so is every block.
                            journal.DoubtEverything();
                        }
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
                    // The first failure is the one reported, unless it was only our reaction to the server's.
                }
                if (!ct.IsCancellationRequested && server.EndedEarly(observer) is { } why)
                    throw new StreamCutException($"{why} (byte {channel.DataBytesRead} of the source's stream): the destination QEMU stopped, the migration failed or was cancelled");
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
            // The image is named but its identity not captured: should the guest run here, its QEMU
            // writes the image and the map is only the peer view (what the sender holds) until this
            // host sends it back; should the migration fail after all (an abort after the mirror's
            // clean end), bfmigd captures the identity once the incoming QEMU stopped, and the retry
            // uses the map.
            observed.Identity = o.DiskImages.TryGetValue(exportName ?? "", out var image) ? DiskImageIdentity.PendingCapture(image.Path, image.Format) : null;
            bool committed = senderClean && !observed.LastTripUnclean && mapPath is not null && journal is not null && digest == senderDigest && TrySave(observed, mapPath, journal);
            settled = committed;
            if (committed)
                stats.DiskMap = mapPath;
            if (!committed)
            {
                TransferLog.Note($"bfmig-transfer: disk map of export '{exportName}' not committed (sender clean {senderClean}, observed clean {!observed.LastTripUnclean}, digests {(digest == senderDigest ? "equal" : "differ")})");
                if (senderClean && !observed.LastTripUnclean && digest != senderDigest)
                {
                    TryDoubtEverything(journal);
                    settled = true;
                }
            }
            stats.Committed = committed;
            stats.SnapshotComplete = committed;
            await channel.WriteChunkAsync(DiskChunk.EndAck, DiskChannel.EncodeFlagDigest(committed, digest), end.Token);
            await channel.Tunnel.ShutdownWriteAsync(end.Token);
            await DrainAsync(channel.Tunnel, end.Token);
            if (exportName is not null && !observer.SawDisconnect && !observer.Opaque && !observer.Failed)
                throw new StreamCutException("the source QEMU's mirror left the NBD connection without NBD_CMD_DISC: the migration was cancelled or failed");
        }
        finally
        {
            if (!settled)
                stats.DiskDoubtAfter = Settle(journal);
            journal?.Dispose();
        }
    }

    // The receiver's retained image, read and compared with its map when its identity was refused
    // (a block device always is); null when it cannot be (not raw, unsafe path, too slow, off).
    private static async Task<DiskRehashResult?> RehashAsync(DiskBlockMap saved, string export, string refused, TransferOptions o, TransferStats stats,
        CancellationToken ct)
    {
        if (o.Rehash is not { } limits || !o.DiskImages.TryGetValue(export, out var image) || DiskRehash.Unsupported(image) is not null)
            return null;
        TransferLog.Note($"bfmig-transfer: re-hashing {image.Path} for export '{export}' ({refused})");
        var (result, why) = await DiskRehash.ProveAsync(image, saved, o.StoreRoot!, limits, o.QemuUser, ct);
        if (result is null)
        {
            TransferLog.Note($"bfmig-transfer: re-hash of {image.Path} gave up: {why}");
            stats.DiskRehash = why;
            return null;
        }
        stats.DiskRehash = result.Describe();
        stats.DiskRehashSeconds = result.Elapsed.TotalSeconds;
        stats.DiskRehashBytes = result.BytesRead;
        TransferLog.Note($"bfmig-transfer: re-hashed {image.Path}: {result.Describe()}");
        return result;
    }

    // One line and the stats say why a map is not used.
    private static void MapUnused(TransferStats stats, string export, string why)
    {
        stats.DiskMapUnused = why;
        TransferLog.Note($"bfmig-transfer: not using the disk map of export '{export}': {why}; the disk is sent whole");
    }

    // A trip that did not commit keeps the saved map, minus exactly what it may have written.
    private static string? Settle(DiskDoubtJournal? journal)
    {
        if (journal is null) return null;
        try
        {
            journal.Settle();
            return journal.Doubt.Describe();
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            // The coarse journal stays: a superset of the exact one.
            TransferLog.Note($"bfmig-transfer: cannot settle the disk map's journal: {e.Message}; its coarse form stays");
            return "coarse journal (settle failed)";
        }
    }

    private static void TryDoubtEverything(DiskDoubtJournal? journal)
    {
        try
        {
            journal?.DoubtEverything();
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            TransferLog.Note($"bfmig-transfer: cannot mark the disk map in doubt: {e.Message}; its journal stays");
        }
    }

    // The map becomes trusted only once it is on disk and the journal is gone; a failure leaves the journal.
    private static bool TrySave(DiskBlockMap map, string path, DiskDoubtJournal journal)
    {
        try
        {
            map.Save(path);
            journal.Clear();
            return true;
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            TransferLog.Note($"bfmig-transfer: cannot save disk map {path}: {e.Message}; the next trip sends everything");
            return false;
        }
    }

    // How the local NBD server's side of the connection ended, as its reader saw it.
    private sealed class ServerSide
    {
        private volatile bool _ended;
        private volatile Exception? _readFailure;

        // Set by the reader of the source's side once it ended.
        public volatile bool ClientEnded;

        public void Ended(Exception? readFailure)
        {
            _readFailure = readFailure;
            _ended = true;
        }

        // Why the server's side ended before the client was done, or null while it runs or when
        // it ended as NBD says it should: after NBD_CMD_DISC or NBD_OPT_ABORT, after the source's
        // side ended, or on a stream not followed. Only the server's own reads count: a failed
        // write to the peer is the peer's failure, reported as such.
        public string? EndedEarly(NbdStreamObserver observer)
        {
            if (!_ended || ClientEnded || observer.ClientFinished)
                return null;
            return _readFailure is { } e
                ? $"the local NBD server's connection failed before NBD_CMD_DISC ({e.Message})"
                : "the local NBD server closed the connection before NBD_CMD_DISC";
        }
    }

    private static async Task ServerToPeerAsync(Stream server, DiskChannel channel, NbdStreamObserver observer, ServerSide side, CancellationToken ct)
    {
        var buffer = ArrayPool<byte>.Shared.Rent(DiskChannel.MaxPayload);
        try
        {
            while (true)
            {
                int n;
                try
                {
                    n = await server.ReadAsync(buffer.AsMemory(0, DiskChannel.MaxPayload), ct);
                }
                catch (Exception e) when (e is IOException or SocketException)
                {
                    side.Ended(e);
                    throw;
                }
                if (n == 0)
                {
                    side.Ended(null);
                    break;
                }
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
    private static bool Observe(Tap tap, ReadOnlySpan<byte> data)
    {
        try
        {
            tap(data);
            return true;
        }
        catch (NbdProtocolException)
        {
            return false;
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
