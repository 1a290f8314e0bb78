namespace BFMig.Transfer.Tests;

public class LocalConnectionTests
{
    // A destination QEMU that has not loaded what it was given holds the writer back: the backlog
    // it must load before it serves the mirror's FLUSH at the switchover stays short.
    [Fact]
    public async Task A_gated_write_waits_while_the_local_TCP_peer_holds_more_than_the_limit_unread()
    {
        var (socket, qemu) = await WireTests.TcpPair();
        using var _ = qemu;
        await using var connection = LocalConnection.FromSocket(socket);

        var data = new byte[LoadGate.MaxLimit * 3];
        Random.Shared.NextBytes(data);
        var write = connection.WriteGatedAsync(data, CancellationToken.None).AsTask();
        await Task.Delay(300);
        Assert.False(write.IsCompleted, "the writer went on while its peer held more than the limit unread");

        var received = new byte[data.Length];
        int read = 0;
        while (read < received.Length) read += await qemu.ReceiveAsync(received.AsMemory(read));
        var waited = await write.WaitAsync(TimeSpan.FromSeconds(10));
        Assert.True(waited > TimeSpan.Zero, "the gate never held the writer back");
        Assert.Equal(data, received);
    }

    [Fact]
    public async Task A_Unix_socket_peer_is_written_to_without_waiting()
    {
        var (socket, peer) = await WireTests.Pair();
        using var _ = peer;
        await using var connection = LocalConnection.FromSocket(socket);
        Assert.Equal(TimeSpan.Zero, await connection.WriteGatedAsync(new byte[1000], CancellationToken.None));
        var buffer = new byte[1000];
        Assert.Equal(1000, await peer.ReceiveAsync(buffer));
    }
}
