
namespace BFMig.Transfer.Disk.Nbd;

public sealed partial class NbdSenderFilter
{
    // Reads client requests until DISC (returns true) or a hard disconnect (false).
    private async Task<bool> ProcessRequestsAsync(NbdInput clientIn, Task pump, CancellationToken ct)
    {
        bool extended = _export.Style == NbdHeaderStyle.Extended;
        while (true)
        {
            var buffered = clientIn.Buffered;
            long at = clientIn.Position;
            if (!NbdRequest.TryRead(ref buffered, extended, _options.MaxPayload, at, out var request))
            {
                if (pump.IsCompleted)
                {
                    await pump;
                    throw NbdProtocolException.At("upstream", at, "server closed the connection while the client was still sending");
                }
                if (!await clientIn.FillAsync(ct))
                {
                    if (clientIn.Buffered.Length > 0)
                        throw NbdProtocolException.At("client", clientIn.Position, $"stream ended inside a request ({clientIn.Buffered.Length} bytes)");
                    await WaitForOutstandingAsync(bounded: true, ct);
                    return false;
                }
                continue;
            }

            Stats.AddRequest();
            var payload = clientIn.BufferedMemory.Slice(NbdRequest.HeaderLength(extended), (int)request.Payload.Length);
            bool disconnect = false;
            switch (request.Command)
            {
                case NbdCommand.Write:
                    await HandleWriteAsync(request, payload, ct);
                    break;
                case NbdCommand.WriteZeroes:
                    await HandleWriteZeroesAsync(request, ct);
                    break;
                case NbdCommand.Flush:
                    await MaterializeZeroesAsync(0, _export.BlockCount, ct);
                    await WaitForOutstandingAsync(bounded: false, ct);
                    _deferZeroes = false;
                    if (_deferredZeroFailed)
                        await SendCompletionAsync(request.Cookie, request.Offset, NbdError.IO, ct);
                    else
                        await RelayAsync(request, payload, ct);
                    break;
                case NbdCommand.Disconnect:
                    await DisconnectAsync(request, ct);
                    disconnect = true;
                    break;
                case NbdCommand.Trim:
                    await MaterializeOverlapAsync(request, ct);
                    MarkUnknown(request.Offset, request.Length);
                    await RelayAsync(request, payload, ct);
                    break;
                case NbdCommand.Read:
                case NbdCommand.Cache:
                case NbdCommand.BlockStatus:
                    await MaterializeOverlapAsync(request, ct);
                    await RelayAsync(request, payload, ct);
                    break;
                default:
                    throw NbdProtocolException.At("client", at + 6, $"command {request.Command} is not supported by the disk filter (cookie 0x{request.Cookie:x})");
            }
            clientIn.ConsumeTo(buffered);
            if (disconnect)
                return true;
        }
    }

    private bool InRange(in NbdRequest request) => _export.InRange(request.Offset, request.Length);

    private async ValueTask HandleWriteAsync(NbdRequest request, ReadOnlyMemory<byte> payload, CancellationToken ct)
    {
        if (!InRange(request))
        {
            // Let the server reject it; nothing on the target changes.
            await RelayAsync(request, payload, ct);
            return;
        }
        await MaterializePartialEdgesAsync(request.Offset, request.Length, ct);
        bool mayElide = (request.Flags & NbdCommandFlags.Fua) == 0;
        ulong end = request.Offset + request.Length;
        long first = (long)(request.Offset / (ulong)_blockSize);
        long last = (long)((end - 1) / (ulong)_blockSize);
        // Hash outside the lock: the reply pump needs it to commit completions.
        var hashes = new UInt128[last - first + 1];
        for (long b = first; b <= last; b++)
        {
            ulong start = Math.Max(request.Offset, BlockStart(b));
            ulong stop = Math.Min(end, BlockEnd(b));
            if (start == BlockStart(b) && stop == BlockEnd(b))
                hashes[b - first] = _export.HashBlock(payload.Span.Slice((int)(start - request.Offset), (int)(stop - start)));
        }
        var runs = new List<(ulong Start, ulong End, List<BlockCommit> Commits, long FullBlocks)>();
        lock (_sync)
        {
            for (long b = first; b <= last; b++)
            {
                ulong start = Math.Max(request.Offset, BlockStart(b));
                ulong stop = Math.Min(end, BlockEnd(b));
                bool full = start == BlockStart(b) && stop == BlockEnd(b);
                var kind = BlockCommitKind.Unknown;
                UInt128 commit = default;
                if (full)
                {
                    var h = hashes[b - first];
                    if (mayElide && _export.Holds(b, h))
                    {
                        ClearPending(b);
                        Stats.AddElided((long)(stop - start));
                        continue;
                    }
                    kind = BlockCommitKind.Data;
                    commit = h;
                }
                else
                {
                    Stats.AddPartial();
                }
                ClearPending(b);
                _export.Forget(b);
                AddToRuns(runs, start, stop, b, kind, commit, full);
            }
        }
        await IssuePartsAsync(request, NbdCommand.Write, runs, payload, ct);
    }

    private async ValueTask HandleWriteZeroesAsync(NbdRequest request, CancellationToken ct)
    {
        if (!InRange(request))
        {
            await RelayAsync(request, ReadOnlyMemory<byte>.Empty, ct);
            return;
        }
        await MaterializePartialEdgesAsync(request.Offset, request.Length, ct);
        bool mayDefer = _deferZeroes && (request.Flags & NbdCommandFlags.Fua) == 0;
        ulong end = request.Offset + request.Length;
        long first = (long)(request.Offset / (ulong)_blockSize);
        long last = (long)((end - 1) / (ulong)_blockSize);
        var runs = new List<(ulong Start, ulong End, List<BlockCommit> Commits, long FullBlocks)>();
        lock (_sync)
        {
            for (long b = first; b <= last; b++)
            {
                ulong start = Math.Max(request.Offset, BlockStart(b));
                ulong stop = Math.Min(end, BlockEnd(b));
                bool full = start == BlockStart(b) && stop == BlockEnd(b);
                bool known = _export.IsKnown(b);
                if (full && _export.Holds(b, _export.ZeroHash(b)) && (request.Flags & NbdCommandFlags.Fua) == 0)
                {
                    ClearPending(b);
                    Stats.AddZeroElided();
                    continue;
                }
                if (full && known && mayDefer)
                {
                    // The target still holds this block's old data; a later WRITE may bring exactly that
                    // back (mirror's pre-zeroing pass). Zero it only if nothing covers it before FLUSH.
                    if (!_pendingZero[b])
                    {
                        _pendingZero[b] = true;
                        _pendingZeroBlocks++;
                        Stats.AddZeroDeferred();
                    }
                    continue;
                }
                if (!full)
                    Stats.AddPartial();
                ClearPending(b);
                _export.Forget(b);
                AddToRuns(runs, start, stop, b, full ? BlockCommitKind.Zero : BlockCommitKind.Unknown, default, full);
            }
        }
        await IssuePartsAsync(request, NbdCommand.WriteZeroes, runs, ReadOnlyMemory<byte>.Empty, ct);
    }

    private static void AddToRuns(List<(ulong Start, ulong End, List<BlockCommit> Commits, long FullBlocks)> runs, ulong start, ulong stop, long block, BlockCommitKind kind, UInt128 hash, bool full)
    {
        if (runs.Count > 0 && runs[^1].End == start)
        {
            var run = runs[^1];
            BlockCommit.Add(run.Commits, block, kind, hash);
            runs[^1] = (run.Start, stop, run.Commits, run.FullBlocks + (full ? 1 : 0));
            return;
        }
        var commits = new List<BlockCommit>();
        BlockCommit.Add(commits, block, kind, hash);
        runs.Add((start, stop, commits, full ? 1 : 0));
    }

    private async ValueTask IssuePartsAsync(NbdRequest request, NbdCommand command, List<(ulong Start, ulong End, List<BlockCommit> Commits, long FullBlocks)> runs, ReadOnlyMemory<byte> payload, CancellationToken ct)
    {
        if (runs.Count == 0)
        {
            await SendCompletionAsync(request.Cookie, request.Offset, NbdError.None, ct);
            return;
        }
        var client = new ClientOp(request.Cookie, request.Offset) { Remaining = runs.Count };
        foreach (var run in runs)
        {
            var op = new UpstreamOp(OpKind.Part, command, run.End - run.Start) { Client = client, Commits = run.Commits };
            var data = command == NbdCommand.Write
                ? payload.Slice((int)(run.Start - request.Offset), (int)(run.End - run.Start))
                : ReadOnlyMemory<byte>.Empty;
            if (command == NbdCommand.Write)
                Stats.AddForwarded(data.Length, run.FullBlocks);
            else
                Stats.AddZeroed(run.FullBlocks);
            await SendUpstreamAsync(op, request.Flags & ~NbdCommandFlags.PayloadLength, command, run.Start, run.End - run.Start, data, ct);
        }
    }

    private async ValueTask RelayAsync(NbdRequest request, ReadOnlyMemory<byte> payload, CancellationToken ct)
    {
        var op = new UpstreamOp(OpKind.Relay, request.Command, request.Length) { ClientCookie = request.Cookie };
        await SendUpstreamAsync(op, request.Flags, request.Command, request.Offset, request.Length, payload, ct);
    }

    private async ValueTask DisconnectAsync(NbdRequest request, CancellationToken ct)
    {
        long before = Stats.ZeroBlocksMaterialized;
        await MaterializeZeroesAsync(0, _export.BlockCount, ct);
        await WaitForOutstandingAsync(bounded: false, ct);
        if (_deferredZeroFailed)
            throw new NbdProtocolException("NBD: deferred zeroes failed on the target; refusing a clean disconnect that would hide it");
        if (Stats.ZeroBlocksMaterialized != before && (_export.ExportFlags & NbdTransmissionFlags.SendFlush) != 0)
        {
            var flush = new UpstreamOp(OpKind.Internal, NbdCommand.Flush, 0);
            await SendUpstreamAsync(flush, NbdCommandFlags.None, NbdCommand.Flush, 0, 0, ReadOnlyMemory<byte>.Empty, ct);
            await flush.Done.Task.WaitAsync(ct);
        }
        _disconnectSent = true;
        await SendUpstreamAsync(null, request.Flags, NbdCommand.Disconnect, request.Offset, request.Length, ReadOnlyMemory<byte>.Empty, ct);
    }

    private async ValueTask SendUpstreamAsync(UpstreamOp? op, NbdCommandFlags flags, NbdCommand command, ulong offset, ulong length, ReadOnlyMemory<byte> payload, CancellationToken ct)
    {
        ulong cookie = _nextCookie++;
        if (op is not null)
        {
            lock (_sync)
                _ops.Add(cookie, op);
        }
        if (command is NbdCommand.Write or NbdCommand.WriteZeroes or NbdCommand.Trim)
            _options.Touching?.Invoke(offset, length);
        int n = NbdRequest.WriteHeader(_requestHeader, _export.Style == NbdHeaderStyle.Extended, flags, command, cookie, offset, length);
        await _upstream.WriteAsync(_requestHeader.AsMemory(0, n), ct);
        if (!payload.IsEmpty)
            await _upstream.WriteAsync(payload, ct);
        await _upstream.FlushAsync(ct);
    }

    private void ClearPending(long block)
    {
        if (_pendingZero[block])
        {
            _pendingZero[block] = false;
            _pendingZeroBlocks--;
        }
    }

    private void MarkUnknown(ulong offset, ulong length)
    {
        ulong size = _export.ExportSize;
        if (length == 0 || offset >= size)
            return;
        ulong end = Math.Min(size, offset + Math.Min(length, size));
        lock (_sync)
        {
            for (long b = (long)(offset / (ulong)_blockSize); b <= (long)((end - 1) / (ulong)_blockSize); b++)
            {
                ClearPending(b);
                _export.Forget(b);
            }
        }
    }

    private ValueTask MaterializeOverlapAsync(in NbdRequest request, CancellationToken ct)
    {
        ulong size = _export.ExportSize;
        if (_pendingZeroBlocks == 0 || request.Length == 0 || request.Offset >= size)
            return ValueTask.CompletedTask;
        ulong end = Math.Min(size, request.Offset + Math.Min(request.Length, size));
        return MaterializeZeroesAsync((long)(request.Offset / (ulong)_blockSize), (long)((end - 1) / (ulong)_blockSize) + 1, ct);
    }

    // A partial write must land after the deferred zero of its block, not race it.
    private async ValueTask MaterializePartialEdgesAsync(ulong offset, ulong length, CancellationToken ct)
    {
        if (_pendingZeroBlocks == 0)
            return;
        ulong end = offset + length;
        long first = (long)(offset / (ulong)_blockSize);
        long last = (long)((end - 1) / (ulong)_blockSize);
        if (offset != BlockStart(first))
            await MaterializeZeroesAsync(first, first + 1, ct);
        if (end != BlockEnd(last))
            await MaterializeZeroesAsync(last, last + 1, ct);
    }

    // Sends the deferred zeroes of blocks [from, to) and waits until the server answered them.
    private async ValueTask MaterializeZeroesAsync(long from, long to, CancellationToken ct)
    {
        if (_pendingZeroBlocks == 0)
            return;
        var runs = new List<(long First, long Count)>();
        long maxBlocks = Math.Max(1, _options.MaxZeroRequest / (uint)_blockSize);
        lock (_sync)
        {
            for (long b = from; b < to; b++)
            {
                if (!_pendingZero[b])
                    continue;
                ClearPending(b);
                _export.Forget(b);
                if (runs.Count > 0 && runs[^1].First + runs[^1].Count == b && runs[^1].Count < maxBlocks)
                    runs[^1] = (runs[^1].First, runs[^1].Count + 1);
                else
                    runs.Add((b, 1));
            }
        }
        var ops = new List<UpstreamOp>(runs.Count);
        foreach (var (firstBlock, count) in runs)
        {
            List<BlockCommit> commits = [new BlockCommit(firstBlock, count, BlockCommitKind.Zero, default)];
            ulong start = BlockStart(firstBlock);
            ulong length = BlockEnd(firstBlock + count - 1) - start;
            var op = new UpstreamOp(OpKind.Internal, NbdCommand.WriteZeroes, length) { Commits = commits };
            ops.Add(op);
            Stats.AddZeroMaterialized(count);
            Stats.AddZeroed(count);
            await SendUpstreamAsync(op, NbdCommandFlags.None, NbdCommand.WriteZeroes, start, length, ReadOnlyMemory<byte>.Empty, ct);
        }
        foreach (var op in ops)
        {
            await op.Done.Task.WaitAsync(ct);
            if (op.Error != 0)
                _deferredZeroFailed = true;
        }
    }

    // Before FLUSH/DISC the wait is unbounded: a slow WAN is still progress, and a broken one fails
    // the reply pump, which fails every waiter. After the client vanished, waiting is only a courtesy.
    private async ValueTask WaitForOutstandingAsync(bool bounded, CancellationToken ct)
    {
        Task[] pending;
        lock (_sync)
            pending = [.. _ops.Values.Select(o => o.Done.Task)];
        if (pending.Length == 0)
            return;
        var all = Task.WhenAll(pending);
        if (!bounded)
        {
            await all.WaitAsync(ct);
            return;
        }
        try
        {
            await all.WaitAsync(_options.DrainTimeout, ct);
        }
        catch (TimeoutException)
        {
            // The trip is unclean anyway; the unanswered blocks are reported unknown.
        }
    }
}
