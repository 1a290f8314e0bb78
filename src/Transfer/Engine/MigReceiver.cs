using BFMig.Transfer.Store;
using BFMig.Transfer.Wire;

namespace BFMig.Transfer.Engine;

/// <summary>
/// Receiving side of a memory stream in store mode: rebuilds the stream with
/// <see cref="MigDecoder"/> into the destination QEMU, carries its return path back as tunnel
/// frames, and commits the store when the sender's end digest equals its own.
/// </summary>
public sealed class MigReceiver
{
    private const int ReverseBuffer = 64 << 10;
    private readonly MemoryStore? _store;
    private readonly MigDecoder _decoder;
    private readonly FrameReader _reader;
    private readonly FrameWriter _writer;
    private readonly TransferStats _stats;
    private readonly string _peerName;
    private readonly TimeSpan _endTimeout;

    public MigReceiver(MemoryStore? store, bool keep, ulong seed, string peerName, FrameReader reader, FrameWriter writer, TransferStats stats, TimeSpan endTimeout)
    {
        _store = store;
        _decoder = new MigDecoder(store, keep, seed, stats);
        _reader = reader;
        _writer = writer;
        _stats = stats;
        _peerName = peerName;
        _endTimeout = endTimeout;
    }

    /// <summary>Runs the stream to its end; on failure the store is abandoned (consistent, no longer in sync).</summary>
    public async Task RunAsync(LocalConnection qemu, CancellationToken ct)
    {
        using var cts = CancellationTokenSource.CreateLinkedTokenSource(ct);
        var reverse = Task.Run(() => ReverseAsync(qemu, cts.Token), cts.Token);
        try
        {
            await ForwardAsync(qemu, reverse, cts.Token);
            var done = await Task.WhenAny(reverse, Task.Delay(_endTimeout, ct));
            if (done == reverse) await reverse;
        }
        catch
        {
            if (_decoder.TripStarted) _store!.Abandon();
            await cts.CancelAsync();
            throw;
        }
    }

    private async Task ForwardAsync(LocalConnection qemu, Task reverse, CancellationToken ct)
    {
        while (true)
        {
            var frame = await _reader.ReadAsync(ct) ?? throw new PeerProtocolException($"peer closed the connection before the end of the stream (at byte {_reader.BytesRead})");
            switch (frame.Type)
            {
                case FrameType.MigData:
                {
                    _decoder.BeginFrame();
                    int pos = 0;
                    do
                    {
                        pos = _decoder.Process(frame.Payload.Span, pos);
                        if (_decoder.Output.Length > 0)
                        {
                            await qemu.Stream.WriteAsync(_decoder.OutputMemory, ct);
                            _stats.StreamBytes += _decoder.Output.Length;
                            _decoder.ResetOutput();
                        }
                    }
                    while (pos < frame.Payload.Length || _decoder.HasPendingOutput);
                    break;
                }
                case FrameType.End:
                {
                    var end = EndMessage.Decode(frame.Payload.Span);
                    if (_decoder.HasPendingOutput) throw new PeerProtocolException("end frame while an elide run is still open");
                    await qemu.Stream.FlushAsync(ct);
                    qemu.HalfClose();
                    bool committed = false;
                    var digest = new byte[16];
                    if (_decoder.TripStarted)
                    {
                        digest = Convert.FromHexString(_store!.ComputeDigest());
                        if (digest.AsSpan().SequenceEqual(end.Digest))
                        {
                            _store.Commit(end.Generation, _peerName, away: false, end.SnapshotComplete);
                            committed = true;
                            _stats.Generation = end.Generation;
                        }
                        else
                        {
                            _store.Abandon();
                        }
                    }
                    _stats.Committed = committed;
                    _stats.SnapshotComplete = end.SnapshotComplete;
                    await _writer.WriteAsync(FrameType.EndAck, new EndAck(committed, digest).Encode(), compress: false, ct);
                    await _writer.FlushAsync(ct);
                    return;
                }
                case FrameType.Abort:
                    throw new PeerAbortedException(Handshake.AbortReason(frame.Payload.Span));
                default:
                    throw new PeerProtocolException($"unexpected {frame.Type} frame in a memory stream at byte {_reader.BytesRead}");
            }
        }
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
