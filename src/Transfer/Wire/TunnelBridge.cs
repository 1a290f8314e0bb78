using System.Buffers;
using System.Net.Sockets;
using System.Runtime.ExceptionServices;

namespace BFMig.Transfer.Wire;

/// <summary>
/// Copies a local connection to and from the peer (YARP's StreamCopier is the model): pooled
/// buffers, EOF passed on as a half-close, and when one direction fails the other stops. A failure
/// says which side broke (<see cref="TunnelException"/>), and a bridge on which no byte moved
/// either way for the idle timeout fails with a <see cref="TimeoutException"/> naming the side it
/// was waiting for.
/// </summary>
public static class TunnelBridge
{
    private const int BufferSize = 256 << 10;

    /// <summary>
    /// Runs both directions; <paramref name="prefix"/> (bytes already read from the local side)
    /// goes first. <paramref name="idleTimeout"/> (<see cref="Timeout.InfiniteTimeSpan"/>: none)
    /// restarts whenever a read or write completes in either direction.
    /// </summary>
    public static async Task CopyBothWaysAsync(Stream local, Action? halfCloseLocal, Stream upstream, ReadOnlyMemory<byte> prefix,
        TransferStats? stats, TimeSpan idleTimeout, CancellationToken ct, TimeProvider? time = null)
    {
        using var cts = CancellationTokenSource.CreateLinkedTokenSource(ct);
        var failure = new FirstFailure();
        var toPeer = new Direction(TunnelSide.Local, TunnelSide.Peer, failure);
        var toLocal = new Direction(TunnelSide.Peer, TunnelSide.Local, failure);
        await using var idle = new IdleWatch(idleTimeout, time ?? TimeProvider.System, cts);
        var up = Task.Run(async () =>
        {
            if (!prefix.IsEmpty)
            {
                await toPeer.WriteAsync(upstream, prefix, idle, cts);
                if (stats is not null) stats.StreamBytes += prefix.Length;
            }
            await toPeer.CopyAsync(local, upstream, n => { if (stats is not null) stats.StreamBytes += n; }, idle, cts);
            await toPeer.RunAsync(async () =>
            {
                if (upstream is IPeerTunnel t) await t.ShutdownWriteAsync(cts.Token);
                else await upstream.FlushAsync(cts.Token);
            }, TunnelSide.Peer, "closing", cts);
        }, CancellationToken.None);
        var down = Task.Run(async () =>
        {
            await toLocal.CopyAsync(upstream, local, n => { if (stats is not null) stats.ReverseBytes += n; }, idle, cts);
            await toLocal.RunAsync(async () =>
            {
                await local.FlushAsync(cts.Token);
                halfCloseLocal?.Invoke();
            }, TunnelSide.Local, "closing", cts);
        }, CancellationToken.None);
        try
        {
            await Task.WhenAll(up, down);
        }
        catch (Exception) when (!ct.IsCancellationRequested)
        {
            // One direction stopped because the other failed or the bridge went idle: report that
            // cause, not the cancellation it caused.
            if (idle.Expired)
                throw new TimeoutException($"tunnel idle for {idleTimeout.TotalSeconds:0.###} s: {WhoIsIdle(toPeer, toLocal)}");
            if (failure.Value is { } cause)
                ExceptionDispatchInfo.Throw(cause);
            throw;
        }
    }

    private static string WhoIsIdle(Direction toPeer, Direction toLocal)
    {
        if (toPeer.Writing)
            return "the peer took no bytes";
        if (toLocal.Writing)
            return "the local side took no bytes";
        return (toPeer.Done, toLocal.Done) switch
        {
            (true, false) => "the peer sent nothing",
            (false, true) => "the local side sent nothing",
            _ => "neither side sent anything",
        };
    }

    // One copy loop: knows what it waits for (to tell who is idle) and which side broke.
    private sealed class Direction(TunnelSide from, TunnelSide to, FirstFailure failure)
    {
        private volatile bool _writing;
        private volatile bool _done;

        public bool Writing => _writing;

        public bool Done => _done;

        public async Task CopyAsync(Stream source, Stream destination, Action<int> count, IdleWatch idle, CancellationTokenSource cts)
        {
            var buffer = ArrayPool<byte>.Shared.Rent(BufferSize);
            try
            {
                while (true)
                {
                    int n = await RunAsync(() => source.ReadAsync(buffer.AsMemory(0, BufferSize), cts.Token).AsTask(), from, "reading", cts);
                    idle.Touch();
                    if (n == 0)
                        break;
                    await WriteAsync(destination, buffer.AsMemory(0, n), idle, cts);
                    count(n);
                }
            }
            finally
            {
                _done = true;
                ArrayPool<byte>.Shared.Return(buffer);
            }
        }

        public async Task WriteAsync(Stream destination, ReadOnlyMemory<byte> data, IdleWatch idle, CancellationTokenSource cts)
        {
            _writing = true;
            await RunAsync(async () =>
            {
                await destination.WriteAsync(data, cts.Token);
                return 0;
            }, to, "writing", cts);
            _writing = false;
            idle.Touch();
        }

        public Task RunAsync(Func<Task> step, TunnelSide side, string operation, CancellationTokenSource cts) =>
            RunAsync(async () =>
            {
                await step();
                return 0;
            }, side, operation, cts);

        // Runs one I/O step on `side`; the first real failure stops the other direction too.
        // Errors of the stream itself name the side; anything else (a peer protocol error) keeps its type.
        public async Task<T> RunAsync<T>(Func<Task<T>> step, TunnelSide side, string operation, CancellationTokenSource cts)
        {
            try
            {
                return await step();
            }
            catch (Exception e) when (e is not OperationCanceledException)
            {
                var named = e is IOException or SocketException or ObjectDisposedException ? new TunnelException(side, operation, e) : e;
                failure.Set(named);
                await cts.CancelAsync();
                ExceptionDispatchInfo.Throw(named);
                throw;
            }
        }
    }

    private sealed class FirstFailure
    {
        private Exception? _value;

        public Exception? Value => Volatile.Read(ref _value);

        public void Set(Exception e) => Interlocked.CompareExchange(ref _value, e, null);
    }

    // The bridge's one idle timer: restarted by every completed read or write in either direction.
    private sealed class IdleWatch : IAsyncDisposable
    {
        private readonly TimeSpan _timeout;
        private readonly ITimer? _timer;
        private volatile bool _expired;

        public IdleWatch(TimeSpan timeout, TimeProvider time, CancellationTokenSource cts)
        {
            _timeout = timeout;
            if (timeout == Timeout.InfiniteTimeSpan)
                return;
            _timer = time.CreateTimer(_ =>
            {
                _expired = true;
                try
                {
                    cts.Cancel();
                }
                catch (ObjectDisposedException)
                {
                    // The bridge ended as the timer fired.
                }
            }, null, timeout, Timeout.InfiniteTimeSpan);
        }

        public bool Expired => _expired;

        public void Touch() => _timer?.Change(_timeout, Timeout.InfiniteTimeSpan);

        public ValueTask DisposeAsync() => _timer?.DisposeAsync() ?? ValueTask.CompletedTask;
    }
}

/// <summary>The two ends of a <see cref="TunnelBridge"/>.</summary>
public enum TunnelSide
{
    /// <summary>The local connection (QEMU, or the local NBD server).</summary>
    Local,

    /// <summary>The peer host, through the tunnel.</summary>
    Peer,
}

/// <summary>A <see cref="TunnelBridge"/> side failed; the other direction was stopped.</summary>
public sealed class TunnelException(TunnelSide side, string operation, Exception inner)
    : IOException($"{(side == TunnelSide.Local ? "local side" : "peer side")} failed while {operation}: {inner.Message}", inner)
{
    /// <summary>The side whose stream failed.</summary>
    public TunnelSide Side { get; } = side;
}
