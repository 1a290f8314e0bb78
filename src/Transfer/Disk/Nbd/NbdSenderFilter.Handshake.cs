using System.Buffers;

namespace BFMig.Transfer.Disk.Nbd;

public sealed partial class NbdSenderFilter
{
    // The handshake is a strict dialogue (client option, server replies until a final one), so it
    // runs sequentially; each message is parsed, then forwarded byte for byte.
    private async Task<HandshakeOutcome> HandshakeAsync(NbdInput clientIn, NbdInput upstreamIn, CancellationToken ct)
    {
        while (true)
        {
            var buffered = upstreamIn.Buffered;
            if (NbdHandshake.TryReadGreeting(ref buffered, upstreamIn.Position, out _))
            {
                await ForwardConsumedAsync(upstreamIn, buffered, _client, ct);
                break;
            }
            await FillOrThrowAsync(upstreamIn, "server greeting", ct);
        }

        NbdClientFlags clientFlags;
        while (true)
        {
            var buffered = clientIn.Buffered;
            if (NbdHandshake.TryReadClientFlags(ref buffered, clientIn.Position, out clientFlags))
            {
                await ForwardConsumedAsync(clientIn, buffered, _upstream, ct);
                break;
            }
            await FillOrThrowAsync(clientIn, "client flags", ct);
        }

        while (true)
        {
            NbdOption option;
            while (true)
            {
                var buffered = clientIn.Buffered;
                if (NbdHandshake.TryReadOption(ref buffered, clientIn.Position, out var request))
                {
                    option = request.Option;
                    if (ExportNameOf(request) is { } name)
                        ExportName = name;
                    await ForwardConsumedAsync(clientIn, buffered, _upstream, ct);
                    break;
                }
                if (!await clientIn.FillAsync(ct))
                {
                    if (clientIn.Buffered.Length > 0)
                        throw NbdProtocolException.At("client option", clientIn.Position, $"stream ended inside an option ({clientIn.Buffered.Length} bytes)");
                    return HandshakeOutcome.Aborted;
                }
            }

            if (option == NbdOption.ExportName)
            {
                while (true)
                {
                    var buffered = upstreamIn.Buffered;
                    bool noZeroes = (clientFlags & NbdClientFlags.NoZeroes) != 0;
                    if (NbdHandshake.TryReadExportNameReply(ref buffered, noZeroes, out ulong size, out var flags))
                    {
                        _export.OnExportInfo(size, flags);
                        await ForwardConsumedAsync(upstreamIn, buffered, _client, ct);
                        return HandshakeOutcome.Transmission;
                    }
                    await FillOrThrowAsync(upstreamIn, "export name reply", ct);
                }
            }

            while (true)
            {
                NbdOptionReply reply;
                var buffered = upstreamIn.Buffered;
                long at = upstreamIn.Position;
                if (!NbdHandshake.TryReadOptionReply(ref buffered, at, out reply))
                {
                    if (!await upstreamIn.FillAsync(ct))
                    {
                        if (option == NbdOption.Abort && upstreamIn.Buffered.Length == 0)
                            return HandshakeOutcome.Aborted;
                        throw NbdProtocolException.At("upstream", upstreamIn.Position, $"stream ended while waiting for the reply to option {option}");
                    }
                    continue;
                }
                if (reply.Option != option)
                    throw NbdProtocolException.At("option reply", at + 8, $"reply names option {(uint)reply.Option} but the client asked for {option}");
                var step = _export.OnOptionReply(option, reply, at);
                await ForwardConsumedAsync(upstreamIn, buffered, _client, ct);
                switch (step)
                {
                    case NbdOptionStep.MoreReplies:
                        continue;
                    case NbdOptionStep.Transmission:
                        return HandshakeOutcome.Transmission;
                    case NbdOptionStep.Opaque:
                        return HandshakeOutcome.Opaque;
                    case NbdOptionStep.Aborted:
                        return HandshakeOutcome.Aborted;
                }
                break;
            }
        }
    }

    // NBD_OPT_EXPORT_NAME carries the bare name; NBD_OPT_GO and NBD_OPT_INFO start with u32 length + name.
    private static string? ExportNameOf(NbdOptionRequest request)
    {
        var data = request.Data.ToArray();
        if (request.Option == NbdOption.ExportName)
            return System.Text.Encoding.UTF8.GetString(data);
        if (request.Option is not (NbdOption.Go or NbdOption.Info) || data.Length < 4)
            return null;
        uint length = System.Buffers.Binary.BinaryPrimitives.ReadUInt32BigEndian(data);
        return length <= (uint)(data.Length - 4) ? System.Text.Encoding.UTF8.GetString(data, 4, (int)length) : null;
    }

    private static async ValueTask ForwardConsumedAsync(NbdInput input, ReadOnlySequence<byte> rest, Stream destination, CancellationToken ct)
    {
        int length = (int)(input.Buffered.Length - rest.Length);
        await destination.WriteAsync(input.BufferedMemory[..length], ct);
        await destination.FlushAsync(ct);
        input.Consume(length);
    }

    private static async ValueTask FillOrThrowAsync(NbdInput input, string waitingFor, CancellationToken ct)
    {
        if (!await input.FillAsync(ct))
            throw NbdProtocolException.At(input.Name, input.Position, $"stream ended while waiting for the {waitingFor} ({input.Buffered.Length} bytes buffered)");
    }

    // After STARTTLS the bytes are encrypted: carry them unchanged, learn nothing.
    private async Task PumpOpaqueAsync(NbdInput clientIn, NbdInput upstreamIn, CancellationTokenSource cts)
    {
        static async Task CopyAsync(NbdInput from, Stream to, CancellationToken ct)
        {
            while (true)
            {
                if (from.Buffered.Length > 0)
                {
                    await to.WriteAsync(from.BufferedMemory, ct);
                    await to.FlushAsync(ct);
                    from.Consume(from.Buffered.Length);
                }
                if (!await from.FillAsync(ct))
                    return;
            }
        }

        var fromClient = CopyAsync(clientIn, _upstream, cts.Token);
        var fromUpstream = CopyAsync(upstreamIn, _client, cts.Token);
        await Task.WhenAny(fromClient, fromUpstream);
        await cts.CancelAsync();
        try
        {
            await Task.WhenAll(fromClient, fromUpstream);
        }
        catch (OperationCanceledException)
        {
        }
    }
}
