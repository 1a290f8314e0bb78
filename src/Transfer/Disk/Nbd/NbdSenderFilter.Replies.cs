using System.Buffers.Binary;

namespace BFMig.Transfer.Disk.Nbd;

public sealed partial class NbdSenderFilter
{
    // Reads upstream replies until the server closes. Replies come in any order; each names the
    // cookie the filter gave its request, which maps back to the client's request.
    private async Task PumpRepliesAsync(NbdInput upstreamIn, CancellationTokenSource cts)
    {
        var ct = cts.Token;
        var header = new byte[NbdReplyHeader.ExtendedLength];
        int maxPayload = _options.MaxPayload + 1024;
        try
        {
            while (true)
            {
                long at = upstreamIn.Position;
                if (!NbdReplyHeader.TryPeek(upstreamIn.Buffered, _export.Style, maxPayload, at, out var reply))
                {
                    if (await upstreamIn.FillAsync(ct))
                        continue;
                    if (upstreamIn.Buffered.Length > 0)
                        throw NbdProtocolException.At("upstream", at, $"stream ended inside a reply ({upstreamIn.Buffered.Length} bytes)");
                    int outstanding;
                    lock (_sync)
                        outstanding = _ops.Count;
                    if (outstanding > 0 || !_disconnectSent)
                        throw NbdProtocolException.At("upstream", at, $"server closed the connection with {outstanding} request(s) outstanding");
                    return;
                }

                UpstreamOp? op;
                lock (_sync)
                    _ops.TryGetValue(reply.Cookie, out op);
                if (op is null)
                    throw NbdProtocolException.At("upstream", at + NbdReplyHeader.CookieOffset, $"reply for unknown cookie 0x{reply.Cookie:x}");

                long payloadLength = reply.Kind == NbdReplyKind.Simple
                    ? (op.Command == NbdCommand.Read && reply.Error == 0 ? (long)op.Length : 0)
                    : (long)reply.PayloadLength;
                if (payloadLength > maxPayload)
                    throw NbdProtocolException.At("upstream", at, $"simple READ reply of {payloadLength} bytes exceeds the limit {maxPayload}");
                int total = reply.HeaderLength + (int)payloadLength;
                if (!await upstreamIn.EnsureAsync(total, ct))
                    throw NbdProtocolException.At("upstream", at, $"stream ended inside a reply ({upstreamIn.Buffered.Length} of {total} bytes)");
                var message = upstreamIn.BufferedMemory[..total];

                uint error = reply.Kind == NbdReplyKind.Simple ? reply.Error : 0;
                if (reply.IsErrorChunk)
                    error = NbdReplyHeader.ParseChunkError(upstreamIn.Buffered.Slice(reply.HeaderLength, payloadLength), at + reply.HeaderLength);
                if (error != 0 && op.Error == 0)
                    op.Error = error;

                if (op.Kind == OpKind.Relay)
                {
                    message.Span[..reply.HeaderLength].CopyTo(header);
                    BinaryPrimitives.WriteUInt64BigEndian(header.AsSpan(NbdReplyHeader.CookieOffset), op.ClientCookie);
                    await _clientWriteLock.WaitAsync(ct);
                    try
                    {
                        await _client.WriteAsync(header.AsMemory(0, reply.HeaderLength), ct);
                        if (payloadLength > 0)
                            await _client.WriteAsync(message[reply.HeaderLength..], ct);
                        await _client.FlushAsync(ct);
                    }
                    finally
                    {
                        _clientWriteLock.Release();
                    }
                }
                upstreamIn.Consume(total);
                if (reply.IsLast)
                    await CompleteAsync(reply.Cookie, op, ct);
            }
        }
        catch (Exception e)
        {
            FailAllOps(e);
            await cts.CancelAsync();
            throw;
        }
    }

    private async ValueTask CompleteAsync(ulong cookie, UpstreamOp op, CancellationToken ct)
    {
        ClientOp? answer = null;
        lock (_sync)
        {
            _ops.Remove(cookie);
            foreach (var commit in op.Commits ?? [])
                _export.Apply(commit, succeeded: op.Error == 0);
            if (op.Client is { } client)
            {
                if (op.Error != 0 && client.Error == 0)
                    client.Error = op.Error;
                if (--client.Remaining == 0)
                    answer = client;
            }
        }
        if (answer is not null)
            await SendCompletionAsync(answer.Cookie, answer.Offset, answer.Error, ct);
        op.Done.TrySetResult();
    }

    private async ValueTask SendCompletionAsync(ulong cookie, ulong offset, uint error, CancellationToken ct)
    {
        var bytes = new byte[40];
        int n = NbdReplyHeader.WriteCompletion(bytes, _export.Style, cookie, offset, error);
        await _clientWriteLock.WaitAsync(ct);
        try
        {
            await _client.WriteAsync(bytes.AsMemory(0, n), ct);
            await _client.FlushAsync(ct);
        }
        finally
        {
            _clientWriteLock.Release();
        }
    }

    private void FailAllOps(Exception e)
    {
        List<UpstreamOp> ops;
        lock (_sync)
        {
            ops = [.. _ops.Values];
            foreach (var op in ops)
            {
                foreach (var commit in op.Commits ?? [])
                    _export.Forget(commit.First, commit.Count);
            }
            _ops.Clear();
        }
        foreach (var op in ops)
            op.Done.TrySetException(e);
    }
}
