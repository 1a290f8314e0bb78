
namespace BFMig.Transfer.Disk.Nbd;

/// <summary>
/// The sender's NBD proxy between the source QEMU's mirror job (the client) and the
/// destination's NBD server (upstream, reached through the WAN tunnel). The handshake passes
/// through unchanged. In transmission, every WRITE is split into blocks of the retained view's
/// block size; a block whose hash equals what the target holds is answered locally and never
/// crosses the WAN. WRITE_ZEROES over blocks the target still holds data in is deferred until a
/// later WRITE either matches that data (elided) or replaces it, or until the next FLUSH/DISC
/// (sent then), so the target ends reading exactly like the source. Any protocol confusion
/// throws <see cref="NbdProtocolException"/>: the caller drops both streams, QEMU fails the
/// migration and the guest keeps running on the source.
/// </summary>
public sealed partial class NbdSenderFilter
{
    private readonly NbdSenderFilterOptions _options;
    private readonly object _sync = new();
    private readonly Dictionary<ulong, UpstreamOp> _ops = [];
    private readonly SemaphoreSlim _clientWriteLock = new(1, 1);
    private readonly byte[] _requestHeader = new byte[NbdRequest.ExtendedHeaderLength];

    private Stream _client = Stream.Null;
    private Stream _upstream = Stream.Null;
    private NbdExportTracker _export = null!;
    // Blocks whose WRITE_ZEROES is deferred (the target still holds their known old data).
    private bool[] _pendingZero = [];
    private int _blockSize;
    private ulong _nextCookie = 1;
    private bool _deferZeroes = true;
    private long _pendingZeroBlocks;
    private bool _deferredZeroFailed;
    private volatile bool _disconnectSent;

    /// <summary>Creates a filter for one NBD connection.</summary>
    public NbdSenderFilter(NbdSenderFilterOptions? options = null) => _options = options ?? new NbdSenderFilterOptions();

    /// <summary>Counters, live during the run.</summary>
    public NbdFilterStats Stats { get; } = new();

    /// <summary>
    /// The export the client asked for in its latest NBD_OPT_GO, NBD_OPT_INFO or
    /// NBD_OPT_EXPORT_NAME (null before any). Set before that option is forwarded upstream.
    /// </summary>
    public string? ExportName { get; private set; }

    /// <summary>
    /// Proxies one NBD connection until the client disconnects. <paramref name="retained"/> is
    /// what the target image holds before this trip (all unknown for a first trip); at the end
    /// (also on failure) the filter reports the target's resulting block map to
    /// <paramref name="recorder"/>. Neither stream is disposed here.
    /// </summary>
    public async Task<NbdFilterResult> RunAsync(Stream client, Stream upstream, IDiskBlockView retained, IDiskRecorder recorder, CancellationToken cancellationToken)
    {
        ArgumentNullException.ThrowIfNull(client);
        ArgumentNullException.ThrowIfNull(upstream);
        ArgumentNullException.ThrowIfNull(retained);
        ArgumentNullException.ThrowIfNull(recorder);
        if (retained.BlockSize < 512 || !int.IsPow2(retained.BlockSize))
            throw new ArgumentException($"block size {retained.BlockSize} of the retained view is not a power of two >= 512", nameof(retained));
        _client = client;
        _upstream = upstream;
        _blockSize = retained.BlockSize;
        _export = new NbdExportTracker(retained);
        int capacity = _options.MaxPayload + 64 * 1024;
        using var clientIn = new NbdInput(client, "client", capacity);
        using var upstreamIn = new NbdInput(upstream, "upstream", capacity);
        using var cts = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken);
        bool clean = false;
        try
        {
            var outcome = await HandshakeAsync(clientIn, upstreamIn, cts.Token);
            if (outcome == HandshakeOutcome.Opaque)
            {
                await PumpOpaqueAsync(clientIn, upstreamIn, cts);
                return new NbdFilterResult(_export.ExportSize, _export.Style, CleanDisconnect: false, Opaque: true);
            }
            if (outcome == HandshakeOutcome.Aborted)
                return new NbdFilterResult(_export.ExportSize, _export.Style, CleanDisconnect: false, Opaque: false);

            StartTransmission();
            var pump = Task.Run(() => PumpRepliesAsync(upstreamIn, cts), CancellationToken.None);
            try
            {
                clean = await ProcessRequestsAsync(clientIn, pump, cts.Token);
            }
            catch (Exception e)
            {
                await cts.CancelAsync();
                FailAllOps(e);
                Exception? pumpError = null;
                try
                {
                    await pump;
                }
                catch (Exception pe)
                {
                    pumpError = pe;
                }
                // When the reply side broke first, the request side only saw the cancellation: report the cause.
                if (e is OperationCanceledException && pumpError is NbdProtocolException && !cancellationToken.IsCancellationRequested)
                    System.Runtime.ExceptionServices.ExceptionDispatchInfo.Throw(pumpError);
                throw;
            }
            if (clean)
            {
                // After DISC every reply is in; the server closes by itself. Do not wait forever if it does not.
                try
                {
                    await pump.WaitAsync(_options.DrainTimeout, cancellationToken);
                }
                catch (TimeoutException)
                {
                }
            }
            await cts.CancelAsync();
            try
            {
                await pump;
            }
            catch (OperationCanceledException) when (!cancellationToken.IsCancellationRequested)
            {
                // The pump was only waiting for a server that has nothing more to say.
            }
            return new NbdFilterResult(_export.ExportSize, _export.Style, clean, Opaque: false);
        }
        finally
        {
            // A pending zero that never went out leaves the target holding its old (known) content.
            lock (_sync)
                _export.Report(recorder, clean);
        }
    }

    private void StartTransmission()
    {
        if (ExportName is { } name && _options.SourceDiskSize?.Invoke(name) is ulong local)
            _export.MaxExportSize = local;
        _export.StartTransmission();
        _pendingZero = new bool[_export.BlockCount];
    }

    private ulong BlockStart(long block) => _export.BlockStart(block);

    private ulong BlockEnd(long block) => _export.BlockEnd(block);

    private enum HandshakeOutcome
    {
        Transmission,
        Opaque,
        Aborted,
    }

    private enum OpKind
    {
        /// <summary>A client request forwarded one to one; its reply is relayed with the client's cookie.</summary>
        Relay,

        /// <summary>One of the pieces a client WRITE/WRITE_ZEROES was split into.</summary>
        Part,

        /// <summary>A request the filter made on its own (deferred zeroes, a flush before DISC).</summary>
        Internal,
    }

    private sealed class ClientOp(ulong cookie, ulong offset)
    {
        public ulong Cookie { get; } = cookie;

        public ulong Offset { get; } = offset;

        public int Remaining { get; set; }

        public uint Error { get; set; }
    }

    private sealed class UpstreamOp(OpKind kind, NbdCommand command, ulong length)
    {
        public OpKind Kind { get; } = kind;

        public NbdCommand Command { get; } = command;

        public ulong Length { get; } = length;

        public ulong ClientCookie { get; init; }

        public ClientOp? Client { get; init; }

        /// <summary>What this request does to target blocks when it succeeds (on failure they become unknown).</summary>
        public List<BlockCommit>? Commits { get; init; }

        public uint Error { get; set; }

        public TaskCompletionSource Done { get; } = new(TaskCreationOptions.RunContinuationsAsynchronously);
    }
}
