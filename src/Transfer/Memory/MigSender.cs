using System.Diagnostics.CodeAnalysis;
using System.Net.Sockets;
using BFMig.Native.Linux;
using BFMig.Transfer.Wire;


namespace BFMig.Transfer.Memory;

/// <summary>
/// Sending side of a memory stream in store mode: reads the source QEMU, encodes with
/// <see cref="MigEncoder"/>, frames to the peer, carries the return path back, and commits the
/// store once the receiver has committed the same digest. Frames are compressed and written by a
/// <see cref="FramePipeline"/> on other threads while this one parses, hashes and records the
/// next. Buffers are bounded (input 256 KiB, <see cref="FramePipeline.DefaultDepth"/> frame
/// buffers), and with a <see cref="StreamPacer"/> the sender stays within a window of what the
/// destination QEMU has taken, so QEMU's own bandwidth estimate sees the rate at which the
/// destination really loads (not just the post-dedup wire rate).
/// </summary>
public sealed class MigSender
{
    private const int InputSize = 256 << 10;
    // Where zero pages were dense in the last read (9 bytes of stream, a page of load each), the
    // next reads are this small, so that one read puts at most about 7 MiB of load past the
    // pacer's window. The first read into a run of zero pages is still a whole one: up to about
    // 29,000 zero pages.
    private const int ZeroDenseRead = 16 << 10;
    private readonly MemoryStore? _store;
    private readonly MigEncoder _encoder;
    private readonly FrameReader _reader;
    private readonly FrameWriter _writer;
    private readonly TransferStats _stats;
    private readonly ulong _newGeneration;
    private readonly string _peerName;
    private readonly TimeSpan _endTimeout;
    // Stream bytes at which QEMU cut the stream (EOF before its device state); -1 while it has not.
    private long _cutAt = -1;
    private FramePipeline? _frames;
    private FramePipeline.Slot? _current;
    private readonly StreamPacer? _pacer;
    private long _consumed;
    private long _wireAtLastWait;
    private readonly bool _synced;
    private bool _returnPathGone;
    // Post-copy arming as reported (TransferStats.PostCopyArmed), and whether QEMU hung up (once
    // seen it stays, so that no later part of the stream arms again): both under this gate only.
    private readonly Lock _armingGate = new();
    private bool _qemuHungUp;
    // The store work of this trip's multifd channels (null without a store, or when it could not listen).
    private ChannelCodecService? _channels;

    // peerDoubt: the receiver's pages in doubt (its hello reply; none without a match).
    // peerIndex: the receiver's page index, when it is not in step with this store (seed is then the index's).
    public MigSender(MemoryStore? store, bool synced, ulong seed, ulong newGeneration, string peerName, FrameReader reader, FrameWriter writer,
        TransferStats stats, TimeSpan endTimeout, StreamPacer? pacer = null, MemoryDoubt? peerDoubt = null, PeerPageIndex? peerIndex = null)
    {
        _pacer = pacer;
        _store = store;
        _synced = synced;
        // Against an index this store starts empty and then holds what the receiver holds: the encoder codes against it as on a match.
        _encoder = new MigEncoder(store, synced || peerIndex is not null, seed, stats) { PeerDoubt = peerDoubt ?? MemoryDoubt.None, CountRounds = true, PeerIndex = peerIndex };
        _reader = reader;
        _writer = writer;
        _stats = stats;
        _newGeneration = newGeneration;
        _peerName = peerName;
        _endTimeout = endTimeout;
    }

    /// <summary>
    /// The store work of this trip's multifd channels, when the caller started it already (before
    /// a long handshake, so that the channels find it); otherwise <see cref="RunAsync"/> starts it.
    /// </summary>
    public ChannelCodecService? Channels { get => _channels; init => _channels = value; }

    /// <summary>Sends a progress report out of turn (the daemon's view of <see cref="TransferStats.PostCopyArmed"/>); null without reports.</summary>
    public Action? ReportNow { get; init; }

    /// <summary>
    /// Runs the stream to its end. On failure the store is abandoned: the committed index stays,
    /// minus what the trip may have written (<see cref="MemoryStore.Abandon"/>).
    /// </summary>
    public async Task RunAsync(LocalConnection qemu, ReadOnlyMemory<byte> prefix, CancellationToken ct)
    {
        using var cts = CancellationTokenSource.CreateLinkedTokenSource(ct);
        _channels ??= ChannelCodecs.TryStart(_store, sending: true);
        var endAck = new TaskCompletionSource<EndAck>(TaskCreationOptions.RunContinuationsAsynchronously);
        await using var frames = new FramePipeline(_writer);
        var inbox = Task.Run(() => InboxAsync(qemu, endAck, cts.Token), cts.Token);
        // A peer that aborts (or a broken return path) must also stop the forward direction, which may be blocked on QEMU.
        _ = inbox.ContinueWith(_ => cts.Cancel(), CancellationToken.None, TaskContinuationOptions.OnlyOnFaulted, TaskScheduler.Default);
        try
        {
            // First, this host's pages in doubt: the receiver unites them with its own before its first page.
            // (None when coding against the receiver's index: this store starts the trip empty.)
            if (_store is not null)
                await _writer.WriteAsync(FrameType.MigDoubt, (_encoder.PeerIndex is null ? _store.Doubt : MemoryDoubt.None).Encode(), compress: true, cts.Token);
            try
            {
                await ForwardAsync(qemu, prefix, frames, cts.Token);
            }
            finally
            {
                ReportArming(ended: true, qemu.Socket, cts.Token);
            }
            var ack = await WaitAsync(endAck.Task, inbox, "the receiver's end acknowledgement", cts.Token);
            if (_encoder.TripStarted)
            {
                // The receiver answered once its channels had ended; this side's must have too before the digests compare.
                if (_channels is not null && await _channels.CloseAsync(0, _endTimeout) is { } channelsFailed)
                    throw new PeerProtocolException(channelsFailed);
                ChannelCodecs.Report(_channels, _stats);
                lock (_store!.Gate)
                {
                    bool agree = ack.Digest.AsSpan().SequenceEqual(Convert.FromHexString(_store.ComputeDigest()));
                    if (ack.Committed && agree)
                    {
                        _store.Commit(_newGeneration, _peerName, _encoder.Parser.RamComplete);
                        _stats.Committed = true;
                        _stats.Generation = _newGeneration;
                    }
                    else if (agree)
                    {
                        // Its commit failed (its journal still names what it wrote): abandoned below, this store keeps its doubt too.
                        throw new PeerProtocolException("the receiver could not commit its store at the end of the trip");
                    }
                    else
                    {
                        // Abandoned below as a whole.
                        throw new StoreOutOfStepException("the receiver's store disagreed at the end of the trip");
                    }
                }
            }
            // Kept (both stores agreed on what was carried), but the migration itself failed; its
            // QEMU is gone, so there is no return path to wait for.
            if (_cutAt >= 0)
                throw new StreamCutException($"the local QEMU ended the migration stream at byte {_cutAt}, before its device state: the migration was cancelled or failed");
            await WaitForInboxAsync(inbox, ct);
        }
        catch (OperationCanceledException) when (!ct.IsCancellationRequested && inbox.IsFaulted)
        {
            Abandon(inbox.Exception!.InnerException!);
            throw inbox.Exception!.InnerException!;
        }
        catch (Exception e)
        {
            Abandon(e);
            await cts.CancelAsync();
            throw;
        }
        finally
        {
            if (_channels is not null) await _channels.DisposeAsync();
            _stats.SnapshotComplete = _encoder.Parser.RamComplete;
            if (_pacer is not null)
            {
                _stats.PacedWaits = _pacer.Waits;
                _stats.PacedWaitSeconds = _pacer.Waited.TotalSeconds;
            }
        }
    }

    private void Abandon(Exception why)
    {
        if (!_encoder.TripStarted) return;
        // No channel may record once the trip is abandoned (the store then refuses them too).
        _channels?.DisposeAsync().AsTask().Wait(TimeSpan.FromSeconds(3));
        lock (_store!.Gate)
        {
            if (!_store.Abandon(MigReceiver.FaultOf(why))) return;
        }
        _stats.MemDoubtAfter = _store.Doubt.Describe();
        TransferLog.Note($"bfmig-transfer: memory trip not committed; in doubt for the next one: {_stats.MemDoubtAfter}");
    }

    // The daemon takes a silent memory connection that follows this stream for the preempt
    // channel at once while this stream is reported armed, so the report must not outlive QEMU's
    // side: a later connection is then a new migration's main stream, which may not have written
    // yet either. Cleared when the stream ends or fails here, and when QEMU hangs up while the
    // forward loop is held (pacing, a full pipeline) and cannot read its end yet.
    private void ReportArming(bool ended, Socket? qemu, CancellationToken stop)
    {
        bool armed = !ended && _encoder.Parser.PostCopyArmed;
        lock (_armingGate)
        {
            if (armed == _stats.PostCopyArmed) return;
            // A QEMU that hung up with its arming bytes still unread here is not armed at all:
            // checked before the report, not left to the watcher's first look.
            if (armed && qemu is not null && HungUp(qemu)) return;
            _stats.PostCopyArmed = armed;
        }
        ReportNow?.Invoke();
        if (armed && qemu is not null)
            _ = Task.Run(() => WatchHangUpAsync(qemu, stop), CancellationToken.None);
    }

    /// <summary>How often an armed stream checks whether QEMU hung up on it.</summary>
    internal static readonly TimeSpan HangUpCheck = TimeSpan.FromMilliseconds(50);

    private async Task WatchHangUpAsync(Socket socket, CancellationToken stop)
    {
        try
        {
            bool hungUp = false;
            while (!hungUp)
            {
                await Task.Delay(HangUpCheck, stop);
                lock (_armingGate)
                {
                    if (!_stats.PostCopyArmed) return;
                    hungUp = HungUp(socket);
                }
            }
        }
        catch (Exception e) when (e is OperationCanceledException or ObjectDisposedException)
        {
            // The stream is over: its end disarmed it.
            return;
        }
        catch (Exception e)
        {
            // A watcher that cannot tell any more disarms: a stale report costs a later migration
            // far more than the 100 ms wait this one's preempt channel may now get.
            TransferLog.Note($"bfmig-transfer: watching QEMU's side of an armed stream failed ({e.Message}): no longer reported armed");
        }
        DisarmForGood();
    }

    // Under _armingGate.
    private bool HungUp(Socket qemu) => _qemuHungUp = _qemuHungUp || UnixSockets.PeerHungUp(qemu);

    private void DisarmForGood()
    {
        lock (_armingGate)
        {
            _qemuHungUp = true;
            if (!_stats.PostCopyArmed) return;
            _stats.PostCopyArmed = false;
        }
        ReportNow?.Invoke();
    }

    private async Task WaitForInboxAsync(Task inbox, CancellationToken ct)
    {
        // The receiver ends the return path when its QEMU closes; do not hang on a QEMU that never does.
        var done = await Task.WhenAny(inbox, Task.Delay(_endTimeout, ct));
        if (done == inbox) await inbox;
    }

    private async Task<T> WaitAsync<T>(Task<T> task, Task inbox, string what, CancellationToken ct)
    {
        var done = await Task.WhenAny(task, inbox, Task.Delay(_endTimeout, ct));
        if (done == task) return await task;
        if (done == inbox)
        {
            // An answer that came before the peer's abort (or close) still counts.
            if (task.IsCompleted) return await task;
            await inbox; // throws the inbox's failure
            if (task.IsCompleted) return await task;
            throw new PeerProtocolException($"peer closed the connection before {what}");
        }
        throw new TimeoutException($"no {what} within {_endTimeout.TotalSeconds:0} s");
    }

    private async Task ForwardAsync(LocalConnection qemu, ReadOnlyMemory<byte> prefix, FramePipeline frames, CancellationToken ct)
    {
        _frames = frames;
        _current = await frames.RentAsync(ct);
        _encoder.SwapOps(_current.Payload);
        var buffer = new byte[InputSize + QemuStreamParser.MaxRecordLength];
        prefix.CopyTo(buffer);
        int start = 0;
        int end = prefix.Length;
        _stats.StreamBytes += prefix.Length;
        bool eof = false;
        bool endSent = false;
        while (true)
        {
            start += _encoder.Consume(buffer.AsSpan(start, end - start), eof);
            _consumed = _stats.StreamBytes - (end - start);
            ReportArming(ended: eof, qemu.Socket, ct);
            // Channels code against the departure snapshot this store shares with the receiver, or against the receiver's index.
            if (_encoder.TripStarted) _channels?.Begin(_synced, _encoder.PeerIndex);
            if (!endSent && _encoder.Parser.IsOpaque)
            {
                // From here on no page is recorded, so the digest is final. End goes ahead of every
                // opaque byte (the encoder stops at the switch): the device state and QEMU's EOF
                // reach the receiver only after End, so a receiver whose store disagrees keeps its
                // QEMU from finishing without holding back any byte of the stream before it. With
                // a return path (libvirt turns it on) the source QEMU closes only after the
                // destination has loaded everything, so End cannot wait for EOF either.
                await SendEndAsync(ct);
                endSent = true;
                if (_encoder.Parser.PostCopy)
                {
                    // The guest is moving to the destination before all its memory did: a cut
                    // stream would leave it split between the hosts, so only QEMU ends this one
                    // now, as over a plain socket (keepalive still finds a vanished peer).
                    _reader.IdleTimeout = Timeout.InfiniteTimeSpan;
                    TransferLog.Note("bfmig-transfer: the trip switched to post-copy: no idle timeout and no pacing from here on");
                }
                continue;
            }
            if (_encoder.OpsLength >= MigEncoder.FlushThreshold)
            {
                await FlushAsync(ct);
                continue;
            }
            if (eof && start == end) break;
            if (start > 0)
            {
                buffer.AsSpan(start, end - start).CopyTo(buffer);
                end -= start;
                start = 0;
            }
            if (_encoder.OpsLength > 0 && qemu.Available == 0) await FlushAsync(ct);
            if (Paced && _pacer.MustWait(_consumed, _stats.ZeroPages))
            {
                // Everything consumed must be on its way, or the receiver could never catch up.
                await FlushAsync(ct);
                await _frames!.FlushAsync(ct);
                var waited = await _pacer.WaitForRoomAsync(_consumed, _stats.ZeroPages, ct);
                _writer.RecordLinkWait(_writer.BytesWritten - _wireAtLastWait, waited);
                _wireAtLastWait = _writer.BytesWritten;
            }
            int n;
            int room = buffer.Length - end;
            if (Paced && ZeroDenseSinceLastRead()) room = Math.Min(room, ZeroDenseRead);
            try
            {
                n = await qemu.Stream.ReadAsync(buffer.AsMemory(end, room), ct);
            }
            catch (IOException) when (!_encoder.Parser.IsOpaque)
            {
                // A cancelled migration may reset the socket: what came before it is whole.
                n = 0;
            }
            if (n == 0)
            {
                eof = true;
                // Every complete stream reaches its device state, where parsing stops.
                if (!_encoder.Parser.IsOpaque) _cutAt = _stats.StreamBytes;
            }
            end += n;
            _stats.StreamBytes += n;
        }
        if (!endSent)
            await SendEndAsync(ct);
        await FlushAsync(ct);
        await frames.FlushAsync(ct);
        await _writer.WriteAsync(FrameType.TunnelEof, _cutAt >= 0 ? CutMark : ReadOnlyMemory<byte>.Empty, compress: false, ct);
        await _writer.FlushAsync(ct);
    }

    /// <summary>Payload of the forward TunnelEof when QEMU cut the stream (empty when it ended it).</summary>
    internal static readonly ReadOnlyMemory<byte> CutMark = new byte[] { 1 };

    /// <summary>Sends every op so far, then End with the stream's hash (the receiver checks it before the rest flows).</summary>
    private async Task SendEndAsync(CancellationToken ct)
    {
        await FlushAsync(ct);
        await _frames!.FlushAsync(ct);
        ushort channels = (ushort)(_channels?.Seal() ?? 0);
        await _writer.WriteAsync(FrameType.End, new EndMessage(_newGeneration, _encoder.StreamDigest(), _encoder.Parser.RamComplete, channels).Encode(), compress: false, ct);
        await _writer.FlushAsync(ct);
    }

    /// <summary>Queues the ops so far as a frame (waiting for a free buffer when all are in flight) and encodes on into a fresh buffer.</summary>
    private async Task FlushAsync(CancellationToken ct)
    {
        _encoder.CompleteOps();
        if (_encoder.OpsLength == 0) return;
        var next = await _frames!.RentAsync(ct);
        int length = _encoder.OpsLength;
        _encoder.SwapOps(next.Payload);
        _frames.Post(_current!, FrameType.MigData, length, compress: true);
        _current = next;
        _pacer?.Sent(_consumed, _stats.ZeroPages);
    }

    // Paced only while the guest runs here: the window informs QEMU's bandwidth estimate, and
    // after the pause (or the switch to post-copy) nothing reads it.
    [MemberNotNullWhen(true, nameof(_pacer))]
    private bool Paced => _pacer is not null && !_encoder.SourcePaused && !_encoder.Parser.PostCopy;

    // The stream consumed so far as load: zero pages count as pages (ProgressMessage.Load).
    private long Load => ProgressMessage.Load(_consumed, _stats.ZeroPages);

    private long _loadAtRead;
    private long _consumedAtRead;

    // True when what was consumed since the last read is at least half zero pages' load.
    private bool ZeroDenseSinceLastRead()
    {
        long load = Load - _loadAtRead, bytes = _consumed - _consumedAtRead;
        (_loadAtRead, _consumedAtRead) = (Load, _consumed);
        return load > 2 * bytes;
    }

    // The destination's return path, handed to the local QEMU while it listens. A QEMU that closed
    // its socket (a cancelled migration: QEMU 10.0's destination still answers as its load fails)
    // needs nothing more from it, and the end exchange must still complete, or the receiver
    // commits the trip alone and the next one finds the generations apart and sends everything.
    private async ValueTask<bool> ReturnPathAsync(LocalConnection qemu, Func<LocalConnection, ValueTask> deliver)
    {
        if (_returnPathGone) return false;
        try
        {
            await deliver(qemu);
            return true;
        }
        catch (Exception e) when (e is IOException or ObjectDisposedException)
        {
            _returnPathGone = true;
            TransferLog.Note($"bfmig-transfer: the local QEMU no longer takes the return path ({e.Message}); the rest of it is dropped");
            return false;
        }
    }

    private async Task InboxAsync(LocalConnection qemu, TaskCompletionSource<EndAck> endAck, CancellationToken ct)
    {
        while (true)
        {
            var frame = await _reader.ReadAsync(ct);
            if (frame is null)
            {
                if (!endAck.Task.IsCompleted) throw new PeerProtocolException("peer closed the connection before acknowledging the end of the stream");
                qemu.HalfClose();
                return;
            }
            var f = frame.Value;
            switch (f.Type)
            {
                case FrameType.Tunnel:
                    if (await ReturnPathAsync(qemu, q => q.Stream.WriteAsync(f.Payload, ct)))
                        _stats.ReverseBytes += f.Payload.Length;
                    break;
                case FrameType.TunnelEof:
                    await ReturnPathAsync(qemu, async q =>
                    {
                        await q.Stream.FlushAsync(ct);
                        q.HalfClose();
                    });
                    if (endAck.Task.IsCompleted) return;
                    break;
                case FrameType.EndAck:
                    endAck.TrySetResult(EndAck.Decode(f.Payload.Span));
                    break;
                case FrameType.Progress when _pacer is not null:
                    _pacer.OnProgress(ProgressMessage.Decode(f.Payload.Span).Delivered);
                    break;
                case FrameType.Abort:
                    throw new PeerAbortedException(Handshake.AbortReason(f.Payload.Span));
                default:
                    throw new PeerProtocolException($"unexpected {f.Type} frame from the receiver at byte {_reader.BytesRead}");
            }
        }
    }
}
