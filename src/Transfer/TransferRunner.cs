using System.Buffers.Binary;
using System.Diagnostics;
using System.Net.Sockets;
using System.Security.Cryptography;
using BFMig.Transfer.Disk;
using BFMig.Transfer.Memory;
using BFMig.Transfer.Store;
using BFMig.Transfer.Wire;

namespace BFMig.Transfer;

/// <summary>Settings of one stream (one helper process).</summary>
public sealed class TransferOptions
{
    public StreamKind Kind { get; init; } = StreamKind.Mig;
    /// <summary>Root of the stores (a guest's store is <c>ROOT/UUID</c>); null runs without a store.</summary>
    public string? StoreRoot { get; init; } = MemoryStore.DefaultRoot;
    public Guid Guest { get; init; }
    /// <summary>Sender: the peer's name (recorded as where the guest went). Receiver: when set, the only sender whose hello it accepts.</summary>
    public string PeerName { get; init; } = "";
    /// <summary>This host's name, sent in the hello.</summary>
    public string LocalName { get; init; } = Environment.MachineName;
    public IPeerAuthenticator Authenticator { get; init; } = NoPeerAuthenticator.Instance;
    public CompressionMode Compression { get; init; } = CompressionMode.Auto;
    public int ZstdLevel { get; init; } = 1;
    public TimeSpan IdleTimeout { get; init; } = TimeSpan.FromSeconds(120);
    /// <summary>
    /// Idle timeout of a plain tunnel (<see cref="TunnelBridge"/>): the memory stream's. A disk
    /// mirror that reached ready waits, idle, for the whole memory stream, so its tunnel has none.
    /// </summary>
    public TimeSpan BridgeIdleTimeout => Kind == StreamKind.Mig ? IdleTimeout : Timeout.InfiniteTimeSpan;
    public TimeSpan HandshakeTimeout { get; init; } = TimeSpan.FromSeconds(30);
    public TimeSpan ConnectTimeout { get; init; } = TimeSpan.FromSeconds(30);
    public TimeSpan EndTimeout { get; init; } = TimeSpan.FromSeconds(30);
    /// <summary>
    /// Kind nbd: the image file behind each export name on this host. The receiver trusts its
    /// retained map of an export only if the map's identity matches this image now; the sender
    /// names its image in the map it saves (identity captured once its QEMU let go of it).
    /// An export not listed here is never elided into.
    /// </summary>
    public IReadOnlyDictionary<string, DiskImageSpec> DiskImages { get; init; } = new Dictionary<string, DiskImageSpec>();

    /// <summary>
    /// What a receiver may spend proving its retained raw image by reading it when the image's
    /// identity cannot (a block device, a file touched since); null: never re-hash.
    /// </summary>
    public DiskRehashLimits? Rehash { get; init; } = DiskRehashLimits.Default;

    /// <summary>The QEMU user: libvirt lends a guest's block device to it (owner) while the guest runs; null: only root's devices are read.</summary>
    public BFMig.Native.Linux.NodeOwner? QemuUser { get; init; }
    /// <summary>Called about every <see cref="ProgressInterval"/> with the stream's live counters (any thread).</summary>
    public Action<TransferProgress>? Progress { get; init; }
    /// <summary>Receiving: called once the sender has proved itself (before anything is opened for it).</summary>
    public Action? PeerProved { get; init; }
    public TimeSpan ProgressInterval { get; init; } = TimeSpan.FromMilliseconds(500);
    /// <summary>
    /// Memory stream with stores: stay within a window of what the destination QEMU has taken
    /// (<see cref="StreamPacer"/>), so that the source QEMU measures the real end-to-end rate
    /// and the guest is not paused while the destination still loads a backlog.
    /// </summary>
    public bool Pacing { get; init; } = true;
    /// <summary>
    /// Sender in transparent mode: the port on the peer that QEMU's connection was aimed at, named
    /// in a route frame sent first (whatever the authentication); 0 in explicit mode.
    /// </summary>
    public ushort TargetPort { get; init; }
    /// <summary>
    /// Sender, kind mig: the guest's main memory stream is already being sent from this host (the
    /// daemon knows): this connection is a multifd channel, or QEMU's post-copy preempt channel
    /// if it stays silent (for <see cref="TransferRunner.FollowerWait"/>).
    /// </summary>
    public bool FollowsMain { get; init; }
    /// <summary>
    /// Sender, with <see cref="FollowsMain"/>: the main stream's helper reported that QEMU advised
    /// post-copy RAM and iterates (<see cref="Memory.QemuStreamParser.PostCopyArmed"/>), so a
    /// connection following it now is the preempt channel: told at once by the absence of bytes
    /// already waiting, not after <see cref="TransferRunner.FollowerFirstBytesWait"/> of silence
    /// the guest would stand still through.
    /// </summary>
    public bool MainPostCopyArmed { get; init; }
    /// <summary>Receiver: a route frame precedes the hello (bfmigd saw one), read and check it even without TLS.</summary>
    public bool RouteFirst { get; init; }
    /// <summary>
    /// Receiver, kind mig: the most RAM the sender may declare (<see cref="RamLimit"/>; the daemon
    /// passes the incoming domain's memory); 0: this host's physical memory.
    /// </summary>
    public long MaxRamBytes { get; init; }
    /// <summary>
    /// Receiver, kind mig: completes once the guest runs on this host (bfmigd, on libvirt's
    /// Resumed/Migrated or Resumed/PostCopy); the store's commit waits for it, at most <see cref="CommitWaitLimit"/>
    /// after the end frame (<see cref="MigReceiver.GuestRuns"/>). Null: the commit starts at the end frame.
    /// </summary>
    public Task? GuestRuns { get; init; }
    /// <summary>How long after the end frame the commit waits for <see cref="GuestRuns"/> at most.</summary>
    public TimeSpan CommitWaitLimit { get; init; } = MigReceiver.DefaultCommitWaitLimit;
    /// <summary>
    /// Receiver: called before a multifd channel connects to the local QEMU, to let the main
    /// channel connect first (<see cref="MainChannelGate"/>); null connects at once.
    /// </summary>
    public Func<CancellationToken, Task>? AwaitMainChannel { get; init; }
    /// <summary>The NBD filter for kind nbd (default: plain tunnel).</summary>
    public IDiskStreamFilter DiskFilter { get; init; } = new PlainDiskStreamFilter();
}

/// <summary>Runs one stream end to end, for the sender or the receiver.</summary>
public static class TransferRunner
{
    /// <summary>
    /// How long a stream waits for its guest's memory store when another helper holds it: the
    /// trip before may still be committing, as late as <see cref="MigReceiver.DefaultCommitWaitLimit"/>
    /// after its end (a guest migrated straight back), and the sender's commit only after that.
    /// </summary>
    internal static readonly TimeSpan StoreLockWait = MigReceiver.DefaultCommitWaitLimit + TimeSpan.FromSeconds(3);

    /// <summary>
    /// Sender: <paramref name="qemu"/> is the local QEMU's connection, <paramref name="peer"/> the
    /// connected socket to the receiving helper.
    /// </summary>
    public static async Task<TransferStats> SendAsync(LocalConnection qemu, Socket peer, TransferOptions o, CancellationToken ct)
    {
        bool taken = false;
        try
        {
            return await SendAsync(qemu, _ =>
            {
                taken = true;
                return Task.FromResult(peer);
            }, o, ct);
        }
        finally
        {
            // A stream that failed before it connected leaves the peer its close, not a handshake timeout.
            if (!taken) peer.Dispose();
        }
    }

    /// <summary>
    /// Sender: <paramref name="qemu"/> is the local QEMU's connection; <paramref name="connectPeer"/>
    /// connects to the receiving helper once QEMU's first bytes said what the stream is (the
    /// receiving daemon gives a connection only <c>PeerListener.HelloTimeout</c> to say it).
    /// </summary>
    public static async Task<TransferStats> SendAsync(LocalConnection qemu, Func<CancellationToken, Task<Socket>> connectPeer, TransferOptions o, CancellationToken ct)
    {
        var stats = new TransferStats { Role = "send", Kind = o.Kind.ToString().ToLowerInvariant() };
        var clock = Stopwatch.StartNew();
        qemu = new LocalConnection(new CountingStream(qemu.Stream, stats, countReads: true), qemu.Socket);
        if (o.Kind == StreamKind.Mig) qemu.LimitReadQueue(LocalConnection.SourceReadQueue);
        bool quiet = o.Kind == StreamKind.Mig && o.FollowsMain && !await ReadableWithinAsync(qemu, FollowerWait(o.MainPostCopyArmed), ct);
        var prefix = o.Kind == StreamKind.Mig && !quiet ? await PeekAsync(qemu.Stream, 8, o.IdleTimeout, ct) : Array.Empty<byte>();
        if (quiet)
            TransferLog.Note("bfmig-transfer: " + (o.MainPostCopyArmed
                ? "a silent memory connection while the main stream is armed for post-copy"
                : $"QEMU sent nothing on a memory connection that followed the main stream within {FollowerFirstBytesWait.TotalMilliseconds:0} ms") +
                ": its post-copy preempt channel, carried byte for byte with no idle timeout");
        MemoryStore? store = null;
        bool diskStore = o.Kind == StreamKind.Nbd && o.StoreRoot is not null;
        bool wantsStore = o.Kind == StreamKind.Mig && o.StoreRoot is not null && prefix.Length >= 4
            && BinaryPrimitives.ReadUInt32BigEndian(prefix) == QemuFormat.FileMagic;
        if (wantsStore)
        {
            try
            {
                store = MemoryStore.Open(o.StoreRoot!, o.Guest, StoreLockWait);
            }
            catch (StoreException e)
            {
                TransferLog.Note($"bfmig-transfer: carrying without store: {e.Message}");
                wantsStore = false;
            }
        }
        bool channel = IsMultifdChannel(o.Kind, prefix);
        Socket? codec = null;
        if (channel && o.StoreRoot is not null)
        {
            // The guest's main stream helper owns the store: a channel is coded through it, or carried as it is.
            (codec, var whyNot) = await CodedChannel.ConnectAsync(Path.Combine(o.StoreRoot, o.Guest.ToString("D")), sending: true, SenderAttachWait, ct);
            if (whyNot is not null) TransferLog.Note($"bfmig-transfer: multifd channel carried byte for byte: {whyNot}");
        }
        Stream secured;
        NetworkStream? raw = null;
        try
        {
            var peer = await connectPeer(ct);
            raw = new NetworkStream(peer, ownsSocket: true);
            PeerSockets.KeepAlive(peer);
            using var hs = CancellationTokenSource.CreateLinkedTokenSource(ct);
            // A receiver that accepts the connection but never finishes TLS must not hold this stream (and the source QEMU) forever.
            hs.CancelAfter(o.HandshakeTimeout);
            if (o.Authenticator.HidesHello || o.TargetPort != 0)
                await new RouteRequest(o.Kind, o.Guest, o.LocalName) { TargetPort = o.TargetPort }.WriteAsync(raw, hs.Token);
            secured = await SecureWithinAsync(raw, isInitiator: true, o.PeerName, o, hs, ct);
        }
        catch
        {
            codec?.Dispose();
            store?.Dispose();
            raw?.Dispose();
            throw;
        }
        await using var transport = secured;
        using var reader = new FrameReader(transport, o.IdleTimeout);
        using var writer = new FrameWriter(transport, o.Compression, o.ZstdLevel);
        await using var progress = ProgressReporter.Start(o, stats, writer, reader);
        try
        {
            var state = store?.State;
            bool paced = wantsStore && o.Pacing;
            var hello = new Hello(o.Kind, wantsStore || diskStore, o.Guest, state?.Generation ?? 0, DigestBytes(state?.Digest), state?.Seed ?? 0,
                RandomNumberGenerator.GetBytes(32), o.LocalName)
            {
                Paced = paced || (codec is not null && o.Pacing),
                MultifdChannel = channel,
                CodedChannel = codec is not null,
                QuietChannel = quiet,
            };
            HelloReply reply;
            using (var hs = CancellationTokenSource.CreateLinkedTokenSource(ct))
            {
                hs.CancelAfter(o.HandshakeTimeout);
                reply = await ExplainTlsCloseAsync(Handshake.ClientAsync(reader, writer, o.Authenticator, hello, hs.Token), o);
            }
            if (diskStore && reply.HasStore)
            {
                await DiskPath.SendAsync(qemu, reader, writer, o, stats, ct);
            }
            else if (o.Kind == StreamKind.Nbd)
            {
                stats.Mode = "plain";
                var tunnel = new PeerByteTunnel(reader, writer);
                await o.DiskFilter.RunAsync(qemu.Stream, tunnel, ct);
                stats.StreamBytes = tunnel.BytesWritten;
                stats.ReverseBytes = tunnel.BytesRead;
            }
            else if (store is not null && reply.HasStore)
            {
                bool synced = reply.Status == HelloStatus.Match;
                // Listening before the index arrives: a big index takes seconds, and the channels look for this helper for 5 s only.
                await using var channels = ChannelCodecs.TryStart(store, sending: true);
                var index = reply.IndexFollows ? await PeerPageIndex.ReadAsync(reader, o.MaxRamBytes > 0 ? o.MaxRamBytes : RamLimit.ForHost(), ct) : null;
                stats.Mode = synced ? "store-match" : index is not null ? "store-index" : "store-full";
                if (index is not null)
                {
                    stats.IndexPages = index.KnownPages;
                    TransferLog.Note($"bfmig-transfer: memory store not in step with the receiver ({reply.Message}): coding against its index of {stats.IndexPages} pages (its generation {index.Generation})");
                }
                else if (!synced)
                    NoteStoreUnused(stats, reply.Message.Length > 0 ? $"the receiver: {reply.Message}" : "the receiver's store differs from this one");
                else if (!store.Doubt.IsEmpty || !reply.Doubt.IsEmpty)
                    TransferLog.Note($"bfmig-transfer: memory store in doubt after an interrupted trip: here {store.Doubt.Describe()}, on the receiver {reply.Doubt.Describe()}: sent in full");
                ulong next = Math.Max(Math.Max(store.State.Generation, reply.Generation), index?.Generation ?? 0) + 1;
                var sender = new MigSender(store, synced, index?.Seed ?? store.State.Seed, next, o.PeerName, reader, writer, stats, o.EndTimeout,
                    paced ? new StreamPacer(o.IdleTimeout) : null, synced ? reply.Doubt : MemoryDoubt.None, index) { Channels = channels, ReportNow = progress is null ? null : progress.ReportNow };
                await sender.RunAsync(qemu, prefix, ct);
            }
            else if (codec is not null)
            {
                stats.Mode = "coded-channel";
                await using var coded = CodedChannel.ForSending(codec, reader, writer, stats, hello.Paced, o.IdleTimeout);
                codec = null;
                await TunnelBridge.CopyBothWaysAsync(qemu.Stream, qemu.HalfClose, coded, prefix, stats, o.BridgeIdleTimeout, ct);
                stats.Multifd = CodedSummary(stats);
                TransferLog.Note($"bfmig-transfer: {stats.Multifd}");
            }
            else
            {
                stats.Mode = hello.QuietChannel ? "quiet-channel" : "plain";
                // A main stream carried plain records nothing: its channels hear so at once instead of looking for 5 s.
                await using var refusing = ChannelCodecs.TryStart(store, sending: true);
                refusing?.Refuse("the receiver keeps no store for this trip");
                var tap = hello.MultifdChannel ? new MultifdChannelTap(qemu.Stream) : null;
                tap?.Observe(prefix);
                try
                {
                    await TunnelBridge.CopyBothWaysAsync(tap ?? qemu.Stream, qemu.HalfClose, new PeerByteTunnel(reader, writer), prefix, stats,
                        BridgeIdleTimeout(hello, reader, o), ct);
                }
                finally
                {
                    if (tap is not null)
                    {
                        stats.Multifd = tap.Summary();
                        TransferLog.Note($"bfmig-transfer: {stats.Multifd}");
                    }
                }
            }
        }
        catch (Exception e) when (e is not OperationCanceledException)
        {
            await TryAbortAsync(writer, e.Message);
            throw;
        }
        finally
        {
            codec?.Dispose();
            store?.Dispose();
            stats.WireBytesOut = writer.BytesWritten;
            stats.WireBytesIn = reader.BytesRead;
            stats.Seconds = clock.Elapsed.TotalSeconds;
        }
        return stats;
    }

    /// <summary>
    /// How long a sending multifd channel's helper looks for its main stream's helper's codec socket
    /// (it appears a moment after, once that helper's handshake is done); without it, the channel is
    /// carried byte for byte, so this is also what a channel waits when there is nothing to find.
    /// </summary>
    public static readonly TimeSpan SenderAttachWait = TimeSpan.FromSeconds(5);

    /// <summary>The same for a receiving channel its sender coded: it has no fallback, so it waits longer (the main helper opens and loads the store first).</summary>
    public static readonly TimeSpan ReceiverAttachWait = TimeSpan.FromSeconds(20);

    private static string CodedSummary(TransferStats s) =>
        $"multifd channel coded against the store: {s.PagesElided} pages elided, {s.PagesReferenced} referenced, {s.PagesDelta} delta, {s.PagesFull} full";

    /// <summary>
    /// Receiver: <paramref name="peer"/> is the accepted socket from the sending helper;
    /// <paramref name="connectLocal"/> opens the connection to the local QEMU (or NBD server).
    /// </summary>
    public static async Task<TransferStats> ReceiveAsync(Socket peer, Func<CancellationToken, Task<LocalConnection>> connectLocal, TransferOptions o,
        CancellationToken ct)
    {
        var stats = new TransferStats { Role = "receive", Kind = o.Kind.ToString().ToLowerInvariant() };
        var clock = Stopwatch.StartNew();
        MemoryStore? store = null;
        var raw = new NetworkStream(peer, ownsSocket: true);
        PeerSockets.KeepAlive(peer);
        if (o.Authenticator.HidesHello || o.RouteFirst)
        {
            RouteRequest route;
            using (var hs = CancellationTokenSource.CreateLinkedTokenSource(ct))
            {
                hs.CancelAfter(o.HandshakeTimeout);
                route = await RouteRequest.ReadAsync(raw, hs.Token);
            }
            if (route.Guest != o.Guest || route.Kind != o.Kind)
                throw new PeerProtocolException($"route names a {route.Kind} stream of guest {route.Guest}, this receiver takes a {o.Kind} stream of {o.Guest}");
        }
        Stream secured;
        using (var hs = CancellationTokenSource.CreateLinkedTokenSource(ct))
        {
            // An unauthenticated client that starts TLS and stalls must not keep this helper (a handshake slot) past the deadline.
            hs.CancelAfter(o.HandshakeTimeout);
            secured = await SecureWithinAsync(raw, isInitiator: false, "", o, hs, ct);
        }
        await using var transport = secured;
        using var reader = new FrameReader(transport, o.IdleTimeout);
        using var writer = new FrameWriter(transport, o.Compression, o.ZstdLevel);
        await using var progress = ProgressReporter.Start(o, stats, writer, reader);
        try
        {
            Hello hello;
            HelloDecision decision;
            using (var hs = CancellationTokenSource.CreateLinkedTokenSource(ct))
            {
                hs.CancelAfter(o.HandshakeTimeout);
                (hello, decision) = await ExplainTlsCloseAsync(Handshake.ServerAsync(reader, writer, o.Authenticator, h => Decide(h, o, stats), hs.Token), o);
            }
            if (decision.Status == HelloStatus.Refused) throw new PeerProtocolException($"refused the sender's stream: {decision.Message}");
            // The sender has proved itself: only now is the store opened and locked, and the daemon told (it then counts this stream as a transfer).
            store = OpenAnsweredStore(hello, decision, o);
            stats.Authenticated = true;
            o.PeerProved?.Invoke();
            progress?.ReportNow();
            Socket? codec = null;
            if (hello.CodedChannel)
            {
                // Its pages come coded against the store: only the main stream's helper, which owns it, can rebuild them.
                string? whyNot = o.StoreRoot is null ? "this receiver has no store" : null;
                if (whyNot is null)
                    (codec, whyNot) = await CodedChannel.ConnectAsync(Path.Combine(o.StoreRoot!, o.Guest.ToString("D")), sending: false, ReceiverAttachWait, ct);
                if (codec is null) throw new PeerProtocolException($"a coded multifd channel, and {whyNot}");
            }
            await using var coded = codec is null ? null : CodedChannel.ForReceiving(codec, reader, writer, stats, hello.Paced);
            // A quiet channel too: a multifd channel whose magic came late would be taken for one, and
            // QEMU 7.2 takes whichever connection comes first for the main stream (the preempt
            // channel itself finds the main one long connected, and waits no time).
            if ((hello.MultifdChannel || hello.QuietChannel) && o.AwaitMainChannel is { } awaitMain)
                await awaitMain(ct);
            var opened = await connectLocal(ct);
            await using var local = new LocalConnection(new CountingStream(opened.Stream, stats, countReads: false), opened.Socket);
            if (o.Kind == StreamKind.Nbd && decision.HasStore)
            {
                await DiskPath.ReceiveAsync(local, reader, writer, o, stats, ct);
            }
            else if (store is not null && hello.WantsStore)
            {
                bool keep = decision.Status == HelloStatus.Match;
                bool indexed = decision.IndexFollows;
                stats.Mode = keep ? "store-match" : indexed ? "store-index" : "store-full";
                // Listening before the index goes out: computing it takes seconds on a big guest, and a coded channel looks for this helper for 20 s only.
                await using var channels = ChannelCodecs.TryStart(store, sending: false);
                if (indexed)
                {
                    stats.IndexPages = await PeerPageIndex.SendAsync(store, writer, ct);
                    TransferLog.Note($"bfmig-transfer: memory store not in step with the sender ({decision.Message}): offered its index of {stats.IndexPages} pages (generation {store.State.Generation})");
                }
                else if (!keep)
                {
                    NoteStoreUnused(stats, decision.Message);
                }
                // Coded against this store's own pages, the trip records under its seed, so what it keeps keeps its index entries.
                var receiver = new MigReceiver(store, keep || indexed, indexed ? store.State.Seed : hello.Seed, hello.SenderName, reader, writer, stats, o.EndTimeout,
                    hello.Paced, o.MaxRamBytes) { Indexed = indexed, Channels = channels, GuestRuns = o.GuestRuns, CommitWaitLimit = o.CommitWaitLimit };
                await receiver.RunAsync(local, ct);
            }
            else if (coded is not null)
            {
                stats.Mode = "coded-channel";
                await TunnelBridge.CopyBothWaysAsync(local.Stream, local.HalfClose, coded, ReadOnlyMemory<byte>.Empty, null, o.BridgeIdleTimeout, ct);
                stats.Multifd = CodedSummary(stats);
            }
            else
            {
                stats.Mode = hello.QuietChannel ? "quiet-channel" : "plain";
                var tunnel = new PeerByteTunnel(reader, writer);
                await TunnelBridge.CopyBothWaysAsync(local.Stream, local.HalfClose, tunnel, ReadOnlyMemory<byte>.Empty, null, BridgeIdleTimeout(hello, reader, o), ct);
                stats.StreamBytes = tunnel.BytesRead;
                stats.ReverseBytes = tunnel.BytesWritten;
            }
        }
        catch (Exception e) when (e is not OperationCanceledException)
        {
            await TryAbortAsync(writer, e.Message);
            throw;
        }
        finally
        {
            store?.Dispose();
            stats.WireBytesOut = writer.BytesWritten;
            stats.WireBytesIn = reader.BytesRead;
            stats.Seconds = clock.Elapsed.TotalSeconds;
        }
        return stats;
    }

    /// <summary>
    /// Answers a hello from what the store says, without opening or locking it: in PSK mode the
    /// sender has not proved anything yet, and a forged hello must not hold the guest's store.
    /// </summary>
    private static HelloDecision Decide(Hello h, TransferOptions o, TransferStats stats)
    {
        var none = new byte[16];
        if (h.Guest != o.Guest) return new HelloDecision(HelloStatus.Refused, false, 0, none, $"this receiver is for guest {o.Guest}, not {h.Guest}");
        if (h.Kind != o.Kind) return new HelloDecision(HelloStatus.Refused, false, 0, none, $"this receiver takes a {o.Kind} stream, not {h.Kind}");
        if (h.CodedChannel && (h.Kind != StreamKind.Mig || h.WantsStore))
            return new HelloDecision(HelloStatus.Refused, false, 0, none, "a coded multifd channel is a memory stream without a store of its own");
        if (o.PeerName.Length > 0 && h.SenderName != o.PeerName)
            return new HelloDecision(HelloStatus.Refused, false, 0, none, $"this receiver takes a stream from {o.PeerName}, not from the sender the hello names");
        if (!h.WantsStore || o.StoreRoot is null) return new HelloDecision(HelloStatus.Mismatch, false, 0, none, "");
        // A disk's map is agreed per export inside the disk channel, once the NBD client names it.
        if (o.Kind == StreamKind.Nbd) return new HelloDecision(HelloStatus.Mismatch, DiskMapStore.TryPrepare(o.StoreRoot, o.Guest), 0, none, "");
        StoreState? s;
        MemoryDoubt doubt;
        try
        {
            (s, doubt) = MemoryStore.Peek(o.StoreRoot, o.Guest) is { } peeked ? (peeked.State, peeked.Doubt) : ((StoreState?)null, MemoryDoubt.None);
        }
        catch (StoreException e)
        {
            TransferLog.Note($"bfmig-transfer: receiving without store: {e.Message}");
            return new HelloDecision(HelloStatus.Mismatch, false, 0, none, "");
        }
        var digest = s is null ? none : DigestBytes(s.Digest);
        bool match = s is not null && s.Generation != 0 && s.Generation == h.Generation && s.Seed == h.Seed && digest.AsSpan().SequenceEqual(h.Digest);
        // A full store file system must not fail the migration: carry this trip plain instead.
        if (StoreSpace.Shortfall(o.StoreRoot, StoreSpace.NeededForMemory(match, o.MaxRamBytes > 0 ? o.MaxRamBytes : RamLimit.ForHost())) is { } why)
        {
            stats.StoreSkipped = why;
            TransferLog.Note($"bfmig-transfer: receiving without store: {why}");
            return new HelloDecision(HelloStatus.Mismatch, false, 0, none, "");
        }
        if (s is null) return new HelloDecision(HelloStatus.Mismatch, true, 0, none, "no store here yet, or its whole store is in doubt after an interrupted trip it could not follow");
        if (match) return new HelloDecision(HelloStatus.Match, true, s.Generation, digest, "") { Doubt = doubt };
        string reason = s.Generation == 0 ? "this store is in step with no peer (generation 0: rebuilt, or never completed a trip)"
            : h.Generation == 0 ? "the sender's store is in step with no peer (generation 0)"
            : s.Generation != h.Generation ? $"generation {s.Generation} here, {h.Generation} on the sender"
            : s.Seed != h.Seed ? "the page-hash seeds differ"
            : "the stores' digests differ";
        // Whatever it last exchanged the guest with, a store still holds pages of it: it offers them by
        // index (sent only once the sender has proved itself). Not for a multifd channel, which has no store of its own.
        return new HelloDecision(HelloStatus.Mismatch, true, s.Generation, digest, reason) { IndexFollows = !h.MultifdChannel && !doubt.Whole };
    }

    /// <summary>
    /// Opens the memory store the reply promised, once the sender is authenticated. If it changed
    /// since the answer (another trip of the same guest got there first), the stream is given up:
    /// the sender would elide against content this host no longer holds.
    /// </summary>
    private static MemoryStore? OpenAnsweredStore(Hello hello, HelloDecision decision, TransferOptions o)
    {
        if (o.Kind != StreamKind.Mig || !decision.HasStore || !hello.WantsStore || o.StoreRoot is null)
            return null;
        MemoryStore store;
        try
        {
            store = MemoryStore.Open(o.StoreRoot, o.Guest, StoreLockWait);
        }
        catch (StoreException e)
        {
            throw new PeerProtocolException($"the memory store promised in the hello reply cannot be opened now: {e.Message}", e);
        }
        if (decision.Status == HelloStatus.Match
            && (store.State.Generation != decision.Generation || !DigestBytes(store.State.Digest).AsSpan().SequenceEqual(decision.Digest) || !store.Doubt.SameAs(decision.Doubt)))
        {
            store.Dispose();
            throw new PeerProtocolException($"the memory store changed during the handshake (generation {decision.Generation} answered, {store.State.Generation} now)");
        }
        store.PacedWriteback = true;
        return store;
    }

    /// <summary>A memory stream that carries without its retained store: one log line, and the reason in the stats.</summary>
    private static void NoteStoreUnused(TransferStats stats, string why)
    {
        stats.StoreUnused = why.Length > 0 ? why : "not in step with the peer";
        TransferLog.Note($"bfmig-transfer: memory store not used, every page sent in full: {stats.StoreUnused}");
    }

    private static async Task<Stream> SecureWithinAsync(Stream raw, bool isInitiator, string peerName, TransferOptions o, CancellationTokenSource hs, CancellationToken ct)
    {
        try
        {
            return await o.Authenticator.SecureAsync(raw, isInitiator, peerName, hs.Token);
        }
        catch (OperationCanceledException) when (!ct.IsCancellationRequested)
        {
            await raw.DisposeAsync();
            throw new PeerProtocolException($"no authenticated connection within {o.HandshakeTimeout.TotalSeconds:F0} s (the peer did not complete the {(o.Authenticator.HidesHello ? "TLS" : "")} handshake)");
        }
    }

    // With TLS 1.3 a side learns that the other rejected its certificate only when the
    // connection closes right after the handshake: say so, the other side's log has the reason.
    private static async Task<T> ExplainTlsCloseAsync<T>(Task<T> handshake, TransferOptions o)
    {
        try
        {
            return await handshake;
        }
        catch (PeerProtocolException e) when (o.Authenticator.HidesHello && e is not PeerAuthenticationException
            && e.Message.Contains("closed the connection", StringComparison.Ordinal))
        {
            throw new PeerProtocolException(e.Message + " (over TLS this usually means the peer rejected this host's certificate; its log says why)", e);
        }
    }

    /// <summary>
    /// How long a memory connection that follows its guest's main stream (<see cref="TransferOptions.FollowsMain"/>)
    /// may stay silent before it is taken for QEMU's post-copy preempt channel. A multifd channel
    /// writes its magic as soon as it connects; the preempt channel writes nothing until the
    /// destination faults on a page, and the destination QEMU, waiting for it before it runs the
    /// guest, faults on none: the guest stands still for this long (post-copy's switch only), unless
    /// the main stream's helper reported it armed for post-copy (no wait then, <see cref="FollowerWait"/>).
    /// A multifd channel slower than this (its thread's first action; a scheduler slice is a few
    /// ms) is carried byte for byte behind the main stream, which is always exact, only not coded
    /// against the store. Transparent mode's sniff waits the same for such a connection (or not at
    /// all when armed and the guest's QEMU held it at the first look), and
    /// carries a silent one straight to the peer's QEMU: a multifd channel that late could reach
    /// a QEMU 7.2 before its main stream and fail the migration cleanly (QEMU up to 10.0 refuses
    /// multifd with post-copy, so a trip has a preempt channel or multifd channels, not both).
    /// </summary>
    public static readonly TimeSpan FollowerFirstBytesWait = TimeSpan.FromMilliseconds(100);

    /// <summary>How long a follower's silence is waited for before it is taken for the preempt channel: not at all when its main stream is armed for post-copy (<see cref="TransferOptions.MainPostCopyArmed"/>).</summary>
    public static TimeSpan FollowerWait(bool mainPostCopyArmed) => mainPostCopyArmed ? TimeSpan.Zero : FollowerFirstBytesWait;

    // True when QEMU's first bytes (or its close) arrive within the wait, or (no wait) are already there; nothing is consumed.
    private static async Task<bool> ReadableWithinAsync(LocalConnection qemu, TimeSpan wait, CancellationToken ct)
    {
        if (qemu.Socket is not { } socket) return true;
        if (wait <= TimeSpan.Zero) return socket.Poll(0, SelectMode.SelectRead);
        using var cts = CancellationTokenSource.CreateLinkedTokenSource(ct);
        cts.CancelAfter(wait);
        try
        {
            await socket.ReceiveAsync(Memory<byte>.Empty, SocketFlags.None, cts.Token);
            return true;
        }
        catch (OperationCanceledException) when (!ct.IsCancellationRequested)
        {
            return false;
        }
    }

    /// <summary>
    /// The idle timeout of a plain tunnel: none for a quiet channel (QEMU may keep it silent for
    /// the whole post-copy phase; keepalive finds a dead peer), whose frame reader then waits for
    /// ever too; the stream kind's otherwise.
    /// </summary>
    private static TimeSpan BridgeIdleTimeout(Hello hello, FrameReader reader, TransferOptions o)
    {
        if (!hello.QuietChannel) return o.BridgeIdleTimeout;
        reader.IdleTimeout = Timeout.InfiniteTimeSpan;
        return Timeout.InfiniteTimeSpan;
    }

    /// <summary>A memory stream whose first bytes are a multifd channel's magic (QEMU connects one per <c>--parallel-connections</c>).</summary>
    private static bool IsMultifdChannel(StreamKind kind, byte[] prefix) =>
        kind == StreamKind.Mig && prefix.Length >= 4 && BinaryPrimitives.ReadUInt32BigEndian(prefix) == QemuFormat.MultifdMagic;

    private static byte[] DigestBytes(string? hex) => string.IsNullOrEmpty(hex) || hex.Length != 32 ? new byte[16] : Convert.FromHexString(hex);

    private static async Task TryAbortAsync(FrameWriter writer, string reason)
    {
        try
        {
            using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(2));
            await writer.WriteAsync(FrameType.Abort, Handshake.EncodeAbort(reason), compress: false, cts.Token);
            await writer.FlushAsync(cts.Token);
        }
        catch (Exception e) when (e is IOException or OperationCanceledException or ObjectDisposedException or SocketException or InvalidOperationException)
        {
            // The peer may already be gone; the abort is a courtesy.
        }
    }

    private static async Task<byte[]> PeekAsync(Stream s, int count, TimeSpan timeout, CancellationToken ct)
    {
        using var cts = CancellationTokenSource.CreateLinkedTokenSource(ct);
        cts.CancelAfter(timeout);
        var buffer = new byte[count];
        int n = 0;
        while (n < 4)
        {
            int r = await s.ReadAsync(buffer.AsMemory(n), cts.Token);
            if (r == 0) break;
            n += r;
        }
        return buffer[..n];
    }
}

/// <summary>Calls <see cref="TransferOptions.Progress"/> every <see cref="TransferOptions.ProgressInterval"/> and once more when disposed.</summary>
internal sealed class ProgressReporter : IAsyncDisposable
{
    private readonly TransferOptions _o;
    private readonly TransferStats _stats;
    private readonly FrameWriter _writer;
    private readonly FrameReader _reader;
    private readonly CancellationTokenSource _stop = new();
    private readonly Task _loop;
    private readonly Lock _gate = new();
    private bool _finalSent;

    private ProgressReporter(TransferOptions o, TransferStats stats, FrameWriter writer, FrameReader reader)
    {
        _o = o;
        _stats = stats;
        _writer = writer;
        _reader = reader;
        _loop = Task.Run(LoopAsync);
    }

    public static ProgressReporter? Start(TransferOptions o, TransferStats stats, FrameWriter writer, FrameReader reader) =>
        o.Progress is null ? null : new ProgressReporter(o, stats, writer, reader);

    private async Task LoopAsync()
    {
        try
        {
            while (true)
            {
                await Task.Delay(_o.ProgressInterval, _stop.Token);
                Report(final: false);
            }
        }
        catch (OperationCanceledException)
        {
            // Disposed: the final report follows.
        }
    }

    // Counters are read while the stream's threads update them: a report may be a moment behind,
    // never wrong in kind. Each report is read and written under one lock, so that a periodic one
    // read before a change cannot land after the out-of-turn report of that change.
    private void Report(bool final)
    {
        lock (_gate)
        {
            // The final report is the last: an out-of-turn one from a thread that was late must not follow it.
            if (_finalSent) return;
            _finalSent = final;
            _o.Progress!(new TransferProgress(_stats.Role, _stats.Kind, _stats.LocalBytes, _writer.BytesWritten, _reader.BytesRead, _stats.Export, final)
            {
                Authenticated = _stats.Authenticated,
                PostCopyArmed = _stats.PostCopyArmed,
            });
        }
    }

    /// <summary>Reports now, out of turn (the peer just authenticated, or the stream's post-copy arming changed: the daemon waits for these).</summary>
    public void ReportNow() => Report(final: false);

    public async ValueTask DisposeAsync()
    {
        await _stop.CancelAsync();
        await _loop;
        Report(final: true);
        _stop.Dispose();
    }
}
