using System.Diagnostics;
using System.Net.Sockets;
using BFMig.Transfer.Tests.Nbd;
using BFMig.Transfer.Wire;
using Xunit;

namespace BFMig.Transfer.Tests;

/// <summary>
/// <see cref="TunnelBridge"/> between real unix sockets and streams that fail or stall: a failure
/// names the side that broke and stops the other direction; a bridge where nothing moves times out.
/// </summary>
public sealed class TunnelBridgeTests
{
    private static readonly TimeSpan Idle = TimeSpan.FromMilliseconds(300);

    [Fact]
    public async Task LocalReadFailureNamesTheLocalSideAndStopsTheOtherDirection()
    {
        var (upstream, peer) = await SocketPair.CreateAsync();
        await using (peer)
        await using (upstream)
        {
            var local = new FaultyStream { ReadError = new IOException("connection reset by QEMU") };
            var e = await Assert.ThrowsAsync<TunnelException>(() => RunAsync(local, upstream, Timeout.InfiniteTimeSpan));
            Assert.Equal(TunnelSide.Local, e.Side);
            Assert.Equal("local side failed while reading: connection reset by QEMU", e.Message);
        }
    }

    [Fact]
    public async Task PeerWriteFailureNamesThePeer()
    {
        var (local, qemu) = await SocketPair.CreateAsync();
        await using (qemu)
        await using (local)
        {
            await qemu.WriteAsync(new byte[4096]);
            var upstream = new FaultyStream { WriteError = new IOException("broken pipe") };
            var e = await Assert.ThrowsAsync<TunnelException>(() => RunAsync(local, upstream, Timeout.InfiniteTimeSpan));
            Assert.Equal(TunnelSide.Peer, e.Side);
            Assert.Contains("peer side failed while writing: broken pipe", e.Message, StringComparison.Ordinal);
        }
    }

    [Fact]
    public async Task PeerProtocolErrorsKeepTheirType()
    {
        var (local, qemu) = await SocketPair.CreateAsync();
        await using (qemu)
        await using (local)
        {
            var upstream = new FaultyStream { ReadError = new PeerProtocolException("frame checksum mismatch") };
            var e = await Assert.ThrowsAsync<PeerProtocolException>(() => RunAsync(local, upstream, Timeout.InfiniteTimeSpan));
            Assert.Equal("frame checksum mismatch", e.Message);
        }
    }

    [Fact]
    public async Task BridgeWhereNothingMovesTimesOut()
    {
        var (local, qemu) = await SocketPair.CreateAsync();
        var (upstream, peer) = await SocketPair.CreateAsync();
        await using (qemu)
        await using (local)
        await using (peer)
        await using (upstream)
        {
            var watch = Stopwatch.StartNew();
            var e = await Assert.ThrowsAsync<TimeoutException>(() => RunAsync(local, upstream, Idle));
            Assert.Equal("tunnel idle for 0.3 s: neither side sent anything", e.Message);
            // The runtime's timers count whole milliseconds of a coarser clock than Stopwatch's, so
            // a timer may fire up to a tick before the stopwatch shows its due time.
            Assert.InRange(watch.Elapsed, Idle - TimeSpan.FromMilliseconds(15), TimeSpan.FromSeconds(10));
        }
    }

    [Fact]
    public async Task PeerThatTakesNoBytesTimesOutByName()
    {
        var (local, qemu) = await SocketPair.CreateAsync();
        await using (qemu)
        await using (local)
        {
            await qemu.WriteAsync(new byte[4096]);
            var upstream = new FaultyStream { StallWrites = true };
            var e = await Assert.ThrowsAsync<TimeoutException>(() => RunAsync(local, upstream, Idle));
            Assert.Contains("the peer took no bytes", e.Message, StringComparison.Ordinal);
        }
    }

    [Fact]
    public async Task TrickleOfBytesKeepsTheBridgeAliveLongerThanTheTimeoutThenSilenceEndsIt()
    {
        var (local, qemu) = await SocketPair.CreateAsync();
        var (upstream, peer) = await SocketPair.CreateAsync();
        await using (qemu)
        await using (local)
        await using (peer)
        await using (upstream)
        {
            var time = new ManualTime();
            var bridge = TunnelBridge.CopyBothWaysAsync(local, null, upstream, ReadOnlyMemory<byte>.Empty, null, Idle, CancellationToken.None, time);
            var one = new byte[1];
            // 12 x 200 ms of activity: well past the 300 ms timeout in all, never 300 ms without a byte.
            for (int i = 0; i < 12; i++)
            {
                time.Advance(TimeSpan.FromMilliseconds(200));
                await qemu.WriteAsync(new[] { (byte)i });
                await peer.ReadExactlyAsync(one);
                Assert.Equal(i, one[0]);
                Assert.False(bridge.IsCompleted);
            }
            time.Advance(TimeSpan.FromMilliseconds(300));
            var e = await Assert.ThrowsAsync<TimeoutException>(() => bridge.WaitAsync(TimeSpan.FromSeconds(10)));
            Assert.Equal("tunnel idle for 0.3 s: neither side sent anything", e.Message);
        }
    }

    private static Task RunAsync(Stream local, Stream upstream, TimeSpan idle) =>
        TunnelBridge.CopyBothWaysAsync(local, null, upstream, ReadOnlyMemory<byte>.Empty, null, idle, CancellationToken.None)
            .WaitAsync(TimeSpan.FromSeconds(10));

    // A stream end that fails or never completes; reads wait until cancelled unless told to fail.
    private sealed class FaultyStream : Stream
    {
        public Exception? ReadError { get; init; }

        public Exception? WriteError { get; init; }

        public bool StallWrites { get; init; }

        public override bool CanRead => true;
        public override bool CanSeek => false;
        public override bool CanWrite => true;
        public override long Length => throw new NotSupportedException();
        public override long Position { get => throw new NotSupportedException(); set => throw new NotSupportedException(); }

        public override async ValueTask<int> ReadAsync(Memory<byte> buffer, CancellationToken cancellationToken = default)
        {
            await Task.Yield();
            if (ReadError is not null)
                throw ReadError;
            await Task.Delay(Timeout.Infinite, cancellationToken);
            return 0;
        }

        public override async ValueTask WriteAsync(ReadOnlyMemory<byte> buffer, CancellationToken cancellationToken = default)
        {
            await Task.Yield();
            if (WriteError is not null)
                throw WriteError;
            if (StallWrites)
                await Task.Delay(Timeout.Infinite, cancellationToken);
        }

        public override Task FlushAsync(CancellationToken cancellationToken) => Task.CompletedTask;

        public override void Flush()
        {
        }

        public override int Read(byte[] buffer, int offset, int count) => throw new NotSupportedException();

        public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();

        public override void SetLength(long value) => throw new NotSupportedException();

        public override void Write(byte[] buffer, int offset, int count) => throw new NotSupportedException();
    }
}
