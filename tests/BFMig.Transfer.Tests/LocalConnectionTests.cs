using System.Net.Sockets;

namespace BFMig.Transfer.Tests;

public class LocalConnectionTests
{
    // A destination QEMU that has not loaded what it was given holds the writer back: the backlog
    // it must load before it serves the mirror's FLUSH at the switchover stays short.
    [Fact]
    public Task A_gated_write_waits_while_the_local_TCP_peer_holds_more_than_the_limit_unread() =>
        AssertHeldBackUntilReadAsync(LoadGate.MaxLimit * 3, LoadGate.MaxLimit * 3, "the writer went on while its peer held more than the limit unread");

    // Bytes that carry more load than their length (zero pages' records: 9 bytes, a page of work
    // each) are held back by their load: 64 KiB is far below the limit, 3 MiB of load is not.
    [Fact]
    public Task A_gated_write_is_held_back_by_its_load_not_its_length() =>
        AssertHeldBackUntilReadAsync(64 << 10, LoadGate.MaxLimit * 3, "64 KiB carrying 3 MiB of load all went to a peer that read nothing");

    // Writes `length` random bytes carrying `load` to a peer that reads nothing for 300 ms: the
    // write must still be held then, and complete exactly once the peer reads everything.
    private static async Task AssertHeldBackUntilReadAsync(long length, long load, string heldMessage)
    {
        var (socket, qemu) = await WireTests.TcpPair();
        using var _ = qemu;
        await using var connection = LocalConnection.FromSocket(socket);

        var data = new byte[length];
        Random.Shared.NextBytes(data);
        var write = connection.WriteGatedAsync(data, load, CancellationToken.None).AsTask();
        await Task.Delay(300);
        Assert.False(write.IsCompleted, heldMessage);

        var received = new byte[data.Length];
        int read = 0;
        while (read < received.Length) read += await qemu.ReceiveAsync(received.AsMemory(read));
        var waited = await write.WaitAsync(TimeSpan.FromSeconds(10));
        Assert.True(waited > TimeSpan.Zero, "the gate never held the writer back");
        Assert.Equal(data, received);
    }

    // A write goes once the reader holds nothing, whatever load it carries: a piece can outweigh
    // any limit (here 1 byte carrying 3 MiB), and waiting for room then would never end.
    [Fact]
    public async Task A_gated_write_heavier_than_the_limit_goes_once_the_reader_holds_nothing()
    {
        var (socket, qemu) = await WireTests.TcpPair();
        using var _ = qemu;
        await using var connection = LocalConnection.FromSocket(socket);

        var write = connection.WriteGatedAsync(new byte[] { 42 }, 3 * LoadGate.MaxLimit, CancellationToken.None).AsTask();
        var one = new byte[1];
        Assert.Equal(1, await qemu.ReceiveAsync(one).WaitAsync(TimeSpan.FromSeconds(10)));
        await write.WaitAsync(TimeSpan.FromSeconds(10));
        Assert.Equal(42, one[0]);
    }

    // The source QEMU's stream must not pile up unread in the helper's socket while the pacer
    // holds the helper back: that backlog is invisible to QEMU and crosses the link after STOP.
    [Fact]
    public async Task A_capped_read_queue_never_holds_more_than_its_cap_while_a_fast_writer_pushes()
    {
        var (socket, qemu) = await WireTests.TcpPair();
        using var _ = qemu;
        await using var connection = LocalConnection.FromSocket(socket);
        connection.LimitReadQueue(LocalConnection.SourceReadQueue);
        Assert.InRange(socket.ReceiveBufferSize, 1, 2 * LocalConnection.SourceReadQueue);

        var data = new byte[32 << 20];
        Random.Shared.NextBytes(data);
        var write = new NetworkStream(qemu).WriteAsync(data).AsTask();
        var received = new byte[data.Length];
        int read = 0, mostQueued = 0;
        // As the helper reads: bursts at full speed (which grow an uncapped queue to several MiB),
        // then pauses while the pacer holds it back.
        while (read < received.Length)
        {
            for (int burst = read + (4 << 20); read < Math.Min(burst, received.Length);)
                read += await connection.Stream.ReadAsync(received.AsMemory(read, Math.Min(256 << 10, received.Length - read)));
            await Task.Delay(20);
            mostQueued = Math.Max(mostQueued, connection.Available);
        }
        await write.WaitAsync(TimeSpan.FromSeconds(10));
        Assert.Equal(data, received);
        // The kernel doubles SO_RCVBUF for its own bookkeeping; the queued payload stays below that.
        Assert.InRange(mostQueued, 1, 2 * LocalConnection.SourceReadQueue);
    }

    [Fact]
    public async Task A_Unix_socket_peer_is_written_to_without_waiting()
    {
        var (socket, peer) = await WireTests.Pair();
        using var _ = peer;
        await using var connection = LocalConnection.FromSocket(socket);
        Assert.Equal(TimeSpan.Zero, await connection.WriteGatedAsync(new byte[1000], 1000, CancellationToken.None));
        var buffer = new byte[1000];
        Assert.Equal(1000, await peer.ReceiveAsync(buffer));
    }
}
