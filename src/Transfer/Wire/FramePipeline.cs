using System.Runtime.ExceptionServices;
using System.Threading.Channels;
using BFMig.Native.Compression;

namespace BFMig.Transfer.Wire;

/// <summary>
/// Compresses and writes frames off the producer's thread, in order, with at most
/// <see cref="Depth"/> payload buffers in existence: the producer fills one while the others are
/// compressed (on the thread pool, so on a second core; several at once) and written. When all
/// are in flight <see cref="RentAsync"/> waits, so a slow peer still slows the producer (and
/// QEMU's bandwidth estimate still sees the WAN) and memory stays bounded at
/// <see cref="Depth"/> x (payload + frame buffer + zstd context).
/// </summary>
public sealed class FramePipeline : IAsyncDisposable
{
    /// <summary>Payload buffers in existence (one filling, the rest compressing or being written).</summary>
    public const int DefaultDepth = 3;

    private readonly FrameWriter _writer;
    private readonly Slot[] _slots;
    private readonly Channel<Slot> _free;
    private readonly Channel<Item> _ordered;
    private readonly CancellationTokenSource _cts = new();
    private readonly Task _drain;
    private ExceptionDispatchInfo? _failure;

    /// <param name="writer">Where frames go; control frames may still be written to it directly after <see cref="FlushAsync"/>.</param>
    /// <param name="depth">Payload buffers (at least 2).</param>
    public FramePipeline(FrameWriter writer, int depth = DefaultDepth)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(depth, 2);
        _writer = writer;
        _slots = new Slot[depth];
        _free = Channel.CreateBounded<Slot>(depth);
        _ordered = Channel.CreateUnbounded<Item>(new UnboundedChannelOptions { SingleReader = true });
        for (int i = 0; i < depth; i++)
        {
            _slots[i] = new Slot(writer.NewZstdContext());
            _free.Writer.TryWrite(_slots[i]);
        }
        _drain = Task.Run(DrainAsync);
    }

    /// <summary>Payload buffers in existence.</summary>
    public int Depth => _slots.Length;

    /// <summary>Frames compressed and written so far.</summary>
    public long FramesWritten { get; private set; }

    /// <summary>A payload buffer of <see cref="FrameCodec.MaxPayload"/> bytes, once one is free.</summary>
    public async ValueTask<Slot> RentAsync(CancellationToken ct)
    {
        ThrowIfFailed();
        try
        {
            return await _free.Reader.ReadAsync(ct);
        }
        catch (ChannelClosedException)
        {
            ThrowIfFailed();
            throw new ObjectDisposedException(nameof(FramePipeline));
        }
    }

    /// <summary>
    /// Queues the first <paramref name="length"/> bytes of <paramref name="slot"/>'s payload as a
    /// frame; compression starts at once on the thread pool. The slot is the pipeline's again.
    /// </summary>
    public void Post(Slot slot, FrameType type, int length, bool compress)
    {
        ThrowIfFailed();
        ArgumentOutOfRangeException.ThrowIfGreaterThan(length, FrameCodec.MaxPayload);
        slot.Encoding = Task.Run(() => _writer.Encode(type, slot.Payload.AsSpan(0, length), compress, slot.Frame, slot.Zstd, detach: true));
        slot.Length = length;
        if (!_ordered.Writer.TryWrite(new Item(slot, null))) ThrowIfFailed();
    }

    /// <summary>Returns a rented slot that will not be posted.</summary>
    public void Return(Slot slot) => _free.Writer.TryWrite(slot);

    /// <summary>Waits until every frame posted so far is written and the stream flushed.</summary>
    public async Task FlushAsync(CancellationToken ct)
    {
        ThrowIfFailed();
        var done = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        if (!_ordered.Writer.TryWrite(new Item(null, done))) ThrowIfFailed();
        await done.Task.WaitAsync(ct);
    }

    private async Task DrainAsync()
    {
        var ct = _cts.Token;
        try
        {
            await foreach (var item in _ordered.Reader.ReadAllAsync(ct))
            {
                if (item.Slot is { } slot)
                {
                    var frame = await slot.Encoding!;
                    await _writer.WriteEncodedAsync(frame, slot.Frame, slot.Payload.AsMemory(0, slot.Length), ct);
                    FramesWritten++;
                    _free.Writer.TryWrite(slot);
                }
                else
                {
                    await _writer.FlushAsync(ct);
                    item.Flushed!.TrySetResult();
                }
            }
        }
        catch (Exception e)
        {
            _failure = ExceptionDispatchInfo.Capture(e);
            _free.Writer.TryComplete(e);
            _ordered.Writer.TryComplete(e);
            while (_ordered.Reader.TryRead(out var left)) left.Flushed?.TrySetException(e);
        }
    }

    private void ThrowIfFailed() => _failure?.Throw();

    /// <summary>Stops writing (frames not yet written are dropped) and frees the buffers and contexts.</summary>
    public async ValueTask DisposeAsync()
    {
        _ordered.Writer.TryComplete();
        await _cts.CancelAsync();
        try
        {
            await _drain;
        }
        catch (OperationCanceledException)
        {
        }
        // A context may only go once no compression uses it.
        foreach (var slot in _slots)
        {
            try
            {
                if (slot.Encoding is { } t) await t;
            }
            catch (Exception)
            {
                // Its failure already failed the pipeline (or nobody waits for it any more).
            }
            slot.Zstd.Dispose();
        }
        _cts.Dispose();
    }

    private readonly record struct Item(Slot? Slot, TaskCompletionSource? Flushed);

    /// <summary>A payload buffer with what it takes to compress it (frame buffer and zstd context).</summary>
    public sealed class Slot
    {
        internal Slot(ZstdCodec zstd) => Zstd = zstd;

        /// <summary>The payload, <see cref="FrameCodec.MaxPayload"/> bytes.</summary>
        public byte[] Payload { get; } = new byte[FrameCodec.MaxPayload];

        internal byte[] Frame { get; } = new byte[FrameCodec.HeaderLength + FrameCodec.MaxWireLength];
        internal ZstdCodec Zstd { get; }
        internal Task<EncodedFrame>? Encoding { get; set; }
        internal int Length { get; set; }
    }
}
