using System.IO.Hashing;
using BFMig.Transfer.Store;
using BFMig.Transfer.Wire;


namespace BFMig.Transfer.Memory;

/// <summary>
/// Receiving side of a memory stream in store mode: rebuilds the stream with
/// <see cref="MigDecoder"/> into the destination QEMU, carries its return path back as tunnel
/// frames, and commits the store when the sender's end digest equals its own. In a paced stream
/// it reports how much of the stream its QEMU has taken (<see cref="StreamPacer"/>).
/// </summary>
public sealed class MigReceiver
{
    private const int ReverseBuffer = 64 << 10;
    /// <summary>A paced stream's progress is reported every this much load (well below <see cref="StreamPacer.MinWindow"/>).</summary>
    public const int ProgressStep = 256 << 10;
    private readonly MemoryStore? _store;
    private readonly MigDecoder _decoder;
    private readonly FrameReader _reader;
    private readonly FrameWriter _writer;
    private readonly TransferStats _stats;
    private readonly string _peerName;
    private readonly TimeSpan _endTimeout;
    // Completed when the sender's QEMU cut the stream (MigSender.CutMark on its TunnelEof): the
    // migration failed, no resume will come here, so the commit need not wait for one.
    private readonly TaskCompletionSource _cut = new(TaskCreationOptions.RunContinuationsAsynchronously);
    private readonly bool _paced;
    private readonly byte[] _progress = new byte[ProgressMessage.Length];
    private long _reported;
    private long _zerosWritten;   // zero pages among the bytes written to QEMU so far
    private bool _endChecked;
    private bool _doubtSeen;
    private Task? _commit;
    // What this side rebuilt before End: End carries the sender's hash of the same bytes.
    private readonly XxHash128 _streamHash = new();
    // The store work of this trip's multifd channels (null without a store, or when it could not listen).
    private ChannelCodecService? _channels;

    public MigReceiver(MemoryStore? store, bool keep, ulong seed, string peerName, FrameReader reader, FrameWriter writer, TransferStats stats, TimeSpan endTimeout,
        bool paced = false, long maxRamBytes = 0)
    {
        _paced = paced;
        _store = store;
        _decoder = new MigDecoder(store, keep, seed, stats, maxRamBytes) { CountRounds = true };
        _reader = reader;
        _writer = writer;
        _stats = stats;
        _peerName = peerName;
        _endTimeout = endTimeout;
    }

    /// <summary>
    /// The sender coded this trip against this host's page index (<see cref="PeerPageIndex"/>),
    /// its own store starting empty: at the end, the pages no stream carried become unknown here
    /// too, so both stores agree.
    /// </summary>
    public bool Indexed { get; init; }

    /// <summary>
    /// The store work of this trip's multifd channels, when the caller started it already (before
    /// sending its page index, so that the channels find it); otherwise <see cref="RunAsync"/> starts it.
    /// </summary>
    public ChannelCodecService? Channels { get => _channels; init => _channels = value; }

    /// <summary>
    /// Completes once the guest runs on this host (bfmigd says so when libvirt reports it resumed
    /// here); null: no one will say. The store's commit waits for it, at most
    /// <see cref="CommitWaitLimit"/> after the end frame. Its fsyncs share this host's file system
    /// with libvirt's, and the destination's libvirt saves the domain's XML (fsync) before it
    /// resumes the guest: begun at the end frame, the commit often queued that fsync behind the
    /// store's pages, and the guest waited (lab, no rate limit, first trips of a guest with 400 MiB
    /// of data: 151-328 ms from QEMU's last load to the resume in 6 of 10; 14-24 ms in 6 of 6 once
    /// the commit waited). QEMU has every byte by then and the return path goes on; only the
    /// sender's own commit waits (for the end acknowledgement), and with it both stores' locks.
    /// </summary>
    public Task? GuestRuns { get; init; }

    /// <summary>The longest the commit waits for <see cref="GuestRuns"/> (a migration that failed here never resumes the guest).</summary>
    public TimeSpan CommitWaitLimit { get; init; } = DefaultCommitWaitLimit;

    /// <summary>Default of <see cref="CommitWaitLimit"/>: well past a resume, well within the sender's end timeout.</summary>
    public static readonly TimeSpan DefaultCommitWaitLimit = TimeSpan.FromSeconds(3);

    /// <summary>
    /// Runs the stream to its end. On failure the store is abandoned: the committed index stays,
    /// minus what the trip may have written (<see cref="MemoryStore.Abandon"/>).
    /// </summary>
    public async Task RunAsync(LocalConnection qemu, CancellationToken ct)
    {
        using var cts = CancellationTokenSource.CreateLinkedTokenSource(ct);
        _channels ??= ChannelCodecs.TryStart(_store, sending: false);
        var reverse = Task.Run(() => ReverseAsync(qemu, cts.Token), cts.Token);
        try
        {
            await ForwardAsync(qemu, reverse, cts.Token);
            await _commit!;
            if (_cut.Task.IsCompleted)
                throw new StreamCutException($"the source QEMU ended the migration stream before its device state (at byte {_stats.StreamBytes} here): the migration was cancelled or failed");
            var done = await Task.WhenAny(reverse, Task.Delay(_endTimeout, ct));
            if (done == reverse) await reverse;
        }
        catch (Exception e)
        {
            await cts.CancelAsync();
            // A commit still waiting for the channels must not keep a failed stream for the end timeout.
            if (_channels is not null) await _channels.DisposeAsync();
            if (_commit is not null)
            {
                try
                {
                    await _commit;
                }
                catch (Exception)
                {
                    // The stream's own failure is the one reported.
                }
            }
            if (_decoder.TripStarted)
            {
                lock (_store!.Gate)
                {
                    if (_store.Abandon(FaultOf(e)))
                    {
                        _stats.MemDoubtAfter = _store.Doubt.Describe();
                        TransferLog.Note($"bfmig-transfer: memory trip not committed; in doubt for the next one: {_stats.MemDoubtAfter}");
                    }
                }
            }
            throw;
        }
        finally
        {
            if (_channels is not null) await _channels.DisposeAsync();
        }
    }

    /// <summary>How a failure found this host's store (the sender's side, when its peer aborted, is only interrupted).</summary>
    internal static MemoryStore.StoreFault FaultOf(Exception e) => e switch
    {
        StoreOutOfStepException { PagesDiffer: true } => MemoryStore.StoreFault.PagesDiffer,
        StoreOutOfStepException => MemoryStore.StoreFault.IndexesDiffer,
        _ => MemoryStore.StoreFault.None,
    };

    private async Task ForwardAsync(LocalConnection qemu, Task reverse, CancellationToken ct)
    {
        while (true)
        {
            var frame = await _reader.ReadAsync(ct) ?? throw new PeerProtocolException($"peer closed the connection before the end of the stream (at byte {_reader.BytesRead})");
            switch (frame.Type)
            {
                case FrameType.MigDoubt:
                {
                    if (_doubtSeen || _decoder.TripStarted)
                        throw new PeerProtocolException($"pages in doubt at byte {_reader.BytesRead}, not as the stream's first frame");
                    _doubtSeen = true;
                    if (MemoryDoubt.Decode(frame.Payload.Span) is not { } d || d.Length != frame.Payload.Length)
                        throw new PeerProtocolException($"the sender's pages in doubt are malformed ({frame.Payload.Length} bytes)");
                    _decoder.PeerDoubt = d.Doubt;
                    break;
                }
                case FrameType.MigData:
                {
                    // The sender's pages in doubt come first: without them, its elisions could name pages that are in doubt here.
                    if (!_doubtSeen && _store is not null) throw new PeerProtocolException("memory stream without the sender's pages in doubt");
                    _decoder.BeginFrame();
                    int pos = 0;
                    do
                    {
                        pos = _decoder.Process(frame.Payload.Span, pos);
                        // The channels are served as soon as the block list began the trip, before any byte
                        // goes to QEMU: QEMU 7.2 reads its main stream only once every channel has connected.
                        if (_decoder.TripStarted) _channels?.Begin(synced: true);
                        if (_decoder.Output.Length > 0)
                        {
                            // Every byte goes to QEMU as soon as it is rebuilt: the sender sends End
                            // before any byte its parser did not understand (device state, QEMU's
                            // EOF), so a QEMU can never finish loading before End checked out. No
                            // byte may wait here for a later frame: with multifd, the source QEMU
                            // sends the next bytes of this stream only after the destination has
                            // taken this stream's EOS (and then its channels' pages).
                            var output = _decoder.OutputMemory;
                            if (!_endChecked) _streamHash.Append(output.Span);
                            long zeros = _stats.ZeroPages - _zerosWritten;
                            _zerosWritten = _stats.ZeroPages;
                            // Once the source paused the guest, a backlog in QEMU's socket costs nothing more
                            // (the guest waits for all of it anyway), and the gate's polls would only leave QEMU idle.
                            if (_decoder.SourcePaused)
                                await qemu.Stream.WriteAsync(output, ct);
                            else if (await qemu.WriteGatedAsync(output, ProgressMessage.Load(output.Length, zeros), ct) is { Ticks: > 0 } waited)
                            {
                                _stats.LoadWaits++;
                                _stats.LoadWaitSeconds += waited.TotalSeconds;
                            }
                            _stats.StreamBytes += output.Length;
                            _decoder.ResetOutput();
                            await ReportProgressAsync(ct);
                        }
                    }
                    while (pos < frame.Payload.Length || _decoder.HasPendingOutput);
                    break;
                }
                case FrameType.End:
                {
                    if (_endChecked) throw new PeerProtocolException($"second end frame at byte {_reader.BytesRead}");
                    var end = EndMessage.Decode(frame.Payload.Span);
                    if (_decoder.HasPendingOutput) throw new PeerProtocolException("end frame while an elide run is still open");
                    _decoder.Seal();
                    var rebuilt = _streamHash.GetCurrentHash();
                    if (!rebuilt.AsSpan().SequenceEqual(end.Digest))
                    {
                        // Some byte QEMU got is not the sender's. The device state comes only after
                        // End, so that guest never starts.
                        await _writer.WriteAsync(FrameType.EndAck, new EndAck(false, new byte[16]).Encode(), compress: false, ct);
                        throw new StoreOutOfStepException(
                            $"the stream rebuilt here is not the sender's (sender {Convert.ToHexStringLower(end.Digest)}, here {Convert.ToHexStringLower(rebuilt)}): end of stream withheld from QEMU");
                    }
                    // Checked: QEMU may finish now. The store's durable commit (fsyncs) follows once
                    // the guest runs here (GuestRuns); until it completes the store stays in flux,
                    // and a crash in between only means that the next trip sends everything.
                    await qemu.Stream.FlushAsync(ct);
                    _endChecked = true;
                    _stats.SnapshotComplete = end.SnapshotComplete;
                    _commit = Task.Run(() => CommitAsync(end, ct), CancellationToken.None);
                    break;
                }
                case FrameType.TunnelEof:
                {
                    // The sender's QEMU closed: the stream is complete (End comes first, checked).
                    if (!_endChecked) throw new PeerProtocolException($"stream ended without an end frame at byte {_reader.BytesRead}");
                    if (frame.Payload.Span.SequenceEqual(MigSender.CutMark.Span)) _cut.TrySetResult();
                    await qemu.Stream.FlushAsync(ct);
                    qemu.HalfClose();
                    return;
                }
                case FrameType.Abort:
                    throw new PeerAbortedException(Handshake.AbortReason(frame.Payload.Span));
                default:
                    throw new PeerProtocolException($"unexpected {frame.Type} frame in a memory stream at byte {_reader.BytesRead}");
            }
        }
    }

    /// <summary>
    /// Once the trip's multifd channels have ended, commits the store (when this trip used one) and
    /// answers the end frame with the outcome and the store's digest, which the sender compares with
    /// its own. A channel that failed (or is still open after the end timeout) leaves the store
    /// uncommitted: the failure is thrown after the answer, and the store abandoned.
    /// </summary>
    private async Task CommitAsync(EndMessage end, CancellationToken ct)
    {
        long waitStart = System.Diagnostics.Stopwatch.GetTimestamp();
        if (GuestRuns is { } runs && _decoder.TripStarted)
        {
            try
            {
                await Task.WhenAny(runs, _cut.Task).WaitAsync(CommitWaitLimit, ct);
            }
            catch (TimeoutException)
            {
                // No word (a daemon that did not see the resume): commit all the same.
            }
            // A stream that failed meanwhile (ct) must not commit: OperationCanceledException goes
            // up, and RunAsync abandons the trip as the sender does, so both stores keep their last commit.
        }
        _stats.CommitWaitSeconds = System.Diagnostics.Stopwatch.GetElapsedTime(waitStart).TotalSeconds;
        long start = System.Diagnostics.Stopwatch.GetTimestamp();
        bool committed = false;
        var digest = new byte[16];
        string? channelsFailed = null;
        if (_decoder.TripStarted)
        {
            if (_channels is not null)
                channelsFailed = await _channels.CloseAsync(end.Channels, _endTimeout);
            else if (end.Channels > 0)
                channelsFailed = $"the sender coded {end.Channels} multifd channel(s) through its store, and this host could not serve them";
            ChannelCodecs.Report(_channels, _stats);
            lock (_store!.Gate)
            {
                if (Indexed) _store.ForgetUntouched();
                digest = Convert.FromHexString(_store.ComputeDigest());
                if (channelsFailed is null)
                {
                    try
                    {
                        _store.Commit(end.Generation, _peerName, end.SnapshotComplete);
                        committed = true;
                        _stats.Generation = end.Generation;
                    }
                    catch (Exception e) when (e is IOException or UnauthorizedAccessException or StoreException)
                    {
                        // QEMU has the whole stream already; the journal still covers every page the trip wrote.
                        TransferLog.Note($"bfmig-transfer: store commit failed, its pages stay in doubt: {e.Message}");
                    }
                }
            }
        }
        _stats.Committed = committed;
        _stats.CommitSeconds = System.Diagnostics.Stopwatch.GetElapsedTime(start).TotalSeconds;
        await _writer.WriteAsync(FrameType.EndAck, new EndAck(committed, digest).Encode(), compress: false, ct);
        await _writer.FlushAsync(ct);
        if (channelsFailed is not null) throw new PeerProtocolException(channelsFailed);
    }

    /// <summary>
    /// In a paced stream, tells the sender how far its QEMU got once another step was taken: the
    /// load it has taken (<see cref="ProgressMessage"/>). Everything decoded so far has been written.
    /// </summary>
    private async ValueTask ReportProgressAsync(CancellationToken ct)
    {
        long load = ProgressMessage.Load(_stats.StreamBytes, _stats.ZeroPages);
        // After the pause the sender no longer paces: a report would only cost a frame and a flush.
        if (!_paced || _decoder.SourcePaused || load - _reported < ProgressStep) return;
        _reported = load;
        new ProgressMessage(_reported).Encode(_progress);
        await _writer.WriteAsync(FrameType.Progress, _progress, compress: false, ct);
        await _writer.FlushAsync(ct);
    }

    private async Task ReverseAsync(LocalConnection qemu, CancellationToken ct)
    {
        var buffer = new byte[ReverseBuffer];
        while (true)
        {
            int n;
            try
            {
                n = await qemu.Stream.ReadAsync(buffer, ct);
            }
            catch (IOException)
            {
                n = 0; // QEMU reset the connection after loading: same as EOF for the return path
            }
            if (n == 0)
            {
                await _writer.WriteAsync(FrameType.TunnelEof, ReadOnlyMemory<byte>.Empty, compress: false, ct);
                await _writer.FlushAsync(ct);
                return;
            }
            await _writer.WriteAsync(FrameType.Tunnel, buffer.AsMemory(0, n), compress: false, ct);
            _stats.ReverseBytes += n;
        }
    }
}
