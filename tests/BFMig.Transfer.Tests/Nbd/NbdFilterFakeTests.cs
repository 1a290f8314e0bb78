using BFMig.Tests.Shared.Nbd;
using BFMig.Transfer.Disk.Nbd;
using BFMig.Transfer.Disk;
using CsCheck;
using Xunit;

namespace BFMig.Transfer.Tests.Nbd;

/// <summary>The filter against an in-memory NBD server: exact sequences and random ones.</summary>
public sealed class NbdFilterFakeTests
{
    private const int BlockSize = 4096;

    private static NbdClientOptions Options(NbdHeaderStyle style) => new()
    {
        RequestStructuredReplies = style != NbdHeaderStyle.Compact,
        RequestExtendedHeaders = style == NbdHeaderStyle.Extended,
        MetaContexts = ["base:allocation"],
    };

    private static FakeNbdServer Server(byte[] disk, NbdHeaderStyle style, int? bogusCookie = null, ulong? failAt = null) =>
        new(disk, structured: style != NbdHeaderStyle.Compact, extended: style == NbdHeaderStyle.Extended) { BogusCookieAtRequest = bogusCookie, FailWritesAt = failAt };

    private static byte[] Random(int length, int seed)
    {
        var b = new byte[length];
        new Random(seed).NextBytes(b);
        return b;
    }

    [Theory]
    [InlineData(NbdHeaderStyle.Compact)]
    [InlineData(NbdHeaderStyle.Structured)]
    [InlineData(NbdHeaderStyle.Extended)]
    public async Task ScriptedPreZeroingSequenceEndsLikeTheSource(NbdHeaderStyle style)
    {
        // Retained target: 32 blocks of data. Source: same except block 3 changed and blocks 20..23
        // discarded (zero). The mirror zeroes everything first, then writes what is allocated.
        byte[] retainedDisk = Random(32 * BlockSize, 1);
        byte[] source = (byte[])retainedDisk.Clone();
        Random(BlockSize, 2).CopyTo(source, 3 * BlockSize);
        Array.Clear(source, 20 * BlockSize, 4 * BlockSize);
        var server = Server((byte[])retainedDisk.Clone(), style);
        var retained = FakeRig.MapOf(retainedDisk, BlockSize);

        var rig = await FakeRig.RunAsync(server, retained, Options(style), async (c, ct) =>
        {
            Assert.Equal(style, c.Style);
            Assert.Equal(0u, await c.CommandAsync(NbdCommand.WriteZeroes, NbdCommandFlags.None, 0, (ulong)source.Length, default, ct));
            for (int b = 0; b < 32; b++)
            {
                if (b is >= 20 and < 24)
                    continue;
                Assert.Equal(0u, await c.CommandAsync(NbdCommand.Write, NbdCommandFlags.None, (ulong)(b * BlockSize), BlockSize, source.AsMemory(b * BlockSize, BlockSize), ct));
            }
            Assert.Equal(0u, await c.CommandAsync(NbdCommand.Flush, NbdCommandFlags.None, 0, 0, default, ct));
            await c.DisconnectAsync(ct);
        });

        Assert.Null(rig.ScriptError);
        Assert.Null(rig.FilterError);
        Assert.True(rig.Result!.CleanDisconnect);
        Assert.Equal(source, server.Disk);
        Assert.Empty(server.Violations);
        Assert.Equal(1, rig.Stats.BlocksForwarded);
        Assert.Equal(27, rig.Stats.BlocksElided);
        Assert.Equal(32, rig.Stats.ZeroBlocksDeferred);
        Assert.Equal(4, rig.Stats.ZeroBlocksMaterialized);
        // No data block and no unneeded zeroing crossed: one WRITE, one WRITE_ZEROES run, FLUSH, DISC.
        Assert.Equal(1, server.Requests.Count(r => r.Command == NbdCommand.Write));
        Assert.Equal(1, server.Requests.Count(r => r.Command == NbdCommand.WriteZeroes));
        Assert.Equal(FakeRig.MapOf(source, BlockSize).ComputeDigest(), rig.Recorded.ComputeDigest());
        Assert.Equal(rig.Recorded.ComputeDigest(), rig.Observed.ComputeDigest());
    }

    [Fact]
    public async Task ExtendedHeadersCarryA64BitLengthWrite()
    {
        byte[] disk = new byte[64 * BlockSize];
        var server = Server(disk, NbdHeaderStyle.Extended);
        byte[] data = Random(40 * BlockSize, 3);
        var rig = await FakeRig.RunAsync(server, new DiskBlockMap((ulong)disk.Length, BlockSize), Options(NbdHeaderStyle.Extended), async (c, ct) =>
        {
            Assert.Equal(NbdHeaderStyle.Extended, c.Style);
            Assert.Equal(0u, await c.CommandAsync(NbdCommand.Write, NbdCommandFlags.None, BlockSize, (ulong)data.Length, data, ct));
            var back = new byte[data.Length];
            await c.ReadAsync(BlockSize, back, ct);
            Assert.Equal(data, back);
            await c.DisconnectAsync(ct);
        });
        Assert.Null(rig.ScriptError);
        Assert.Null(rig.FilterError);
        Assert.Equal(NbdHeaderStyle.Extended, rig.Result!.Style);
        Assert.Equal(data, disk.AsSpan(BlockSize, data.Length).ToArray());
        Assert.Equal(rig.Recorded.ComputeDigest(), rig.Observed.ComputeDigest());
    }

    [Fact]
    public async Task FuaWritesAreNeverElided()
    {
        byte[] disk = Random(8 * BlockSize, 4);
        var server = Server((byte[])disk.Clone(), NbdHeaderStyle.Structured);
        var rig = await FakeRig.RunAsync(server, FakeRig.MapOf(disk, BlockSize), Options(NbdHeaderStyle.Structured), async (c, ct) =>
        {
            Assert.Equal(0u, await c.CommandAsync(NbdCommand.Write, NbdCommandFlags.Fua, 0, BlockSize, disk.AsMemory(0, BlockSize), ct));
            Assert.Equal(0u, await c.CommandAsync(NbdCommand.Write, NbdCommandFlags.None, BlockSize, BlockSize, disk.AsMemory(BlockSize, BlockSize), ct));
            await c.DisconnectAsync(ct);
        });
        Assert.Null(rig.FilterError);
        Assert.Equal(1, rig.Stats.BlocksForwarded);
        Assert.Equal(1, rig.Stats.BlocksElided);
        Assert.Contains(server.Requests, r => r.Command == NbdCommand.Write && (r.Flags & NbdCommandFlags.Fua) != 0);
    }

    [Fact]
    public async Task UpstreamWriteErrorReachesTheClientWithItsCookieAndLeavesTheBlockUnknown()
    {
        byte[] disk = new byte[8 * BlockSize];
        var server = Server(disk, NbdHeaderStyle.Structured, failAt: 5 * BlockSize);
        byte[] data = Random(4 * BlockSize, 5);
        var rig = await FakeRig.RunAsync(server, new DiskBlockMap((ulong)disk.Length, BlockSize), Options(NbdHeaderStyle.Structured), async (c, ct) =>
        {
            ulong cookie = await c.SendRequestAsync(NbdCommand.Write, NbdCommandFlags.None, 4 * BlockSize, (ulong)data.Length, data, ct);
            var (replyCookie, error) = await c.ReadReplyAsync(Memory<byte>.Empty, 0, ct);
            Assert.Equal(cookie, replyCookie);
            Assert.Equal(NbdError.IO, error);
            await c.DisconnectAsync(ct);
        });
        Assert.Null(rig.ScriptError);
        Assert.Null(rig.FilterError);
        Assert.False(rig.Recorded.TryGetHash(5, out _));
        Assert.Equal(rig.Recorded.ComputeDigest(), rig.Observed.ComputeDigest());
    }

    [Fact]
    public async Task ReplyWithUnknownCookieFailsTheStream()
    {
        byte[] disk = new byte[8 * BlockSize];
        var server = Server(disk, NbdHeaderStyle.Structured, bogusCookie: 2);
        var rig = await FakeRig.RunAsync(server, new DiskBlockMap((ulong)disk.Length, BlockSize), Options(NbdHeaderStyle.Structured), async (c, ct) =>
        {
            for (int i = 0; i < 3; i++)
                await c.CommandAsync(NbdCommand.Write, NbdCommandFlags.None, (ulong)(i * BlockSize), BlockSize, new byte[BlockSize].AsMemory(), ct);
            await c.DisconnectAsync(ct);
        }, timeoutSeconds: 15);
        var error = Assert.IsType<NbdProtocolException>(rig.FilterError);
        Assert.Contains("unknown cookie", error.Message, StringComparison.Ordinal);
        Assert.NotNull(rig.ScriptError);
        Assert.True(rig.Recorded.LastTripUnclean);
    }

    [Fact]
    public async Task HardDisconnectEndsPromptlyAndRecordsAnUncleanTrip()
    {
        byte[] retainedDisk = Random(8 * BlockSize, 6);
        var server = Server((byte[])retainedDisk.Clone(), NbdHeaderStyle.Structured);
        var started = DateTime.UtcNow;
        var rig = await FakeRig.RunAsync(server, FakeRig.MapOf(retainedDisk, BlockSize), Options(NbdHeaderStyle.Structured), async (c, ct) =>
        {
            Assert.Equal(0u, await c.CommandAsync(NbdCommand.Write, NbdCommandFlags.None, 0, BlockSize, Random(BlockSize, 7), ct));
            // A deferred zero that never gets a FLUSH: the target keeps its old block, and the map must say so.
            Assert.Equal(0u, await c.CommandAsync(NbdCommand.WriteZeroes, NbdCommandFlags.None, BlockSize, BlockSize, default, ct));
        });
        Assert.Null(rig.FilterError);
        Assert.False(rig.Result!.CleanDisconnect);
        Assert.True(DateTime.UtcNow - started < TimeSpan.FromSeconds(5));
        Assert.True(rig.Recorded.LastTripUnclean);
        Assert.True(rig.Recorded.TryGetHash(1, out var kept));
        Assert.Equal(FakeRig.MapOf(server.Disk, BlockSize).ComputeDigest(), rig.Recorded.ComputeDigest());
        FakeRig.MapOf(retainedDisk, BlockSize).TryGetHash(1, out var old);
        Assert.Equal(old, kept);
    }

    /// <summary>
    /// The target's server goes away (its QEMU was killed: an aborted migration) while the mirror
    /// waits with a request in flight. The filter gives up at once with the reason and fails the
    /// client's request, instead of waiting (the issue saw about two minutes) for a client that
    /// waits for it.
    /// </summary>
    [Fact]
    public async Task AServerThatGoesAwayEndsTheFilterWithinSecondsWhileTheClientWaits()
    {
        byte[] disk = Random(8 * BlockSize, 8);
        var server = new FakeNbdServer((byte[])disk.Clone(), structured: true) { CloseAfterRequests = 1 };
        var (clientSide, filterClient) = await SocketPair.CreateAsync();
        var (filterUp, serverSide) = await SocketPair.CreateAsync();
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(60));
        var serverTask = Task.Run(() => server.RunAsync(serverSide, cts.Token));
        var filter = new NbdSenderFilter();
        var recorded = new DiskBlockMap(0, BlockSize);
        var filterTask = Task.Run(() => filter.RunAsync(filterClient, filterUp, FakeRig.MapOf(disk, BlockSize), recorded, cts.Token));
        await using var client = await NbdClient.ConnectAsync(clientSide, Options(NbdHeaderStyle.Structured), cts.Token);
        Assert.Equal(0u, await client.CommandAsync(NbdCommand.Write, NbdCommandFlags.None, 0, BlockSize, Random(BlockSize, 9), cts.Token));
        var started = DateTime.UtcNow;
        // The second write reaches a server that is gone; the client then waits for its reply.
        var second = client.CommandAsync(NbdCommand.Write, NbdCommandFlags.None, BlockSize, BlockSize, Random(BlockSize, 10), cts.Token);
        var error = await Assert.ThrowsAsync<NbdProtocolException>(() => filterTask.WaitAsync(TimeSpan.FromSeconds(10)));
        Assert.Contains("server closed the connection", error.Message);
        Assert.True(DateTime.UtcNow - started < TimeSpan.FromSeconds(5), $"the filter took {DateTime.UtcNow - started} to give up");
        Assert.True(recorded.LastTripUnclean);
        // Its caller closes the client connection: the client's request then fails rather than hangs.
        await filterClient.DisposeAsync();
        await Assert.ThrowsAnyAsync<Exception>(() => second.WaitAsync(TimeSpan.FromSeconds(10)));
        await serverTask.WaitAsync(TimeSpan.FromSeconds(10));
        await clientSide.DisposeAsync();
        await filterUp.DisposeAsync();
        await serverSide.DisposeAsync();
    }

    [Fact]
    public async Task StartTlsTurnsTheFilterIntoAnOpaquePump()
    {
        var (client, filterClient) = await SocketPair.CreateAsync();
        var (filterUp, server) = await SocketPair.CreateAsync();
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(10));
        var recorder = new DiskBlockMap(1 << 20, BlockSize);
        var filter = new NbdSenderFilter();
        var run = Task.Run(() => filter.RunAsync(filterClient, filterUp, FakeRig.MapOf(new byte[1 << 20], BlockSize), recorder, cts.Token));
        var greeting = new byte[NbdHandshake.GreetingLength];
        NbdHandshake.WriteGreeting(greeting, NbdHandshakeFlags.FixedNewstyle);
        await server.WriteAsync(greeting, cts.Token);
        await client.WriteAsync(new byte[] { 0, 0, 0, 1 }, cts.Token);
        var option = new byte[NbdHandshake.OptionHeaderLength];
        NbdHandshake.WriteOptionHeader(option, NbdOption.StartTls, 0);
        await client.WriteAsync(option, cts.Token);
        var ack = new byte[NbdHandshake.OptionReplyHeaderLength];
        NbdHandshake.WriteOptionReplyHeader(ack, NbdOption.StartTls, NbdOptionReplyType.Ack, 0);
        await server.WriteAsync(ack, cts.Token);
        // What follows would be TLS records: arbitrary bytes that must pass unchanged both ways.
        byte[] up = Random(5000, 8);
        byte[] down = Random(7000, 9);
        await client.WriteAsync(up, cts.Token);
        await server.WriteAsync(down, cts.Token);
        var seenByServer = new byte[NbdHandshake.OptionHeaderLength + 4 + up.Length];
        await server.ReadExactlyAsync(seenByServer, cts.Token);
        var seenByClient = new byte[NbdHandshake.GreetingLength + ack.Length + down.Length];
        await client.ReadExactlyAsync(seenByClient, cts.Token);
        Assert.Equal(up, seenByServer[^up.Length..]);
        Assert.Equal(down, seenByClient[^down.Length..]);
        client.Socket.Shutdown(System.Net.Sockets.SocketShutdown.Both);
        var result = await run.WaitAsync(cts.Token);
        Assert.True(result.Opaque);
        Assert.True(recorder.LastTripUnclean);
        Assert.Equal(0, recorder.KnownCount);
        foreach (var s in new[] { client, filterClient, filterUp, server })
            await s.DisposeAsync();
    }

    [Fact]
    public async Task RetainedViewOfAnotherSizeIsNotTrusted()
    {
        byte[] disk = Random(8 * BlockSize, 10);
        var server = Server((byte[])disk.Clone(), NbdHeaderStyle.Structured);
        // Same content, but the map describes a 9-block image: the image was resized since.
        var resized = FakeRig.MapOf([.. disk, .. new byte[BlockSize]], BlockSize);
        var rig = await FakeRig.RunAsync(server, resized, Options(NbdHeaderStyle.Structured), async (c, ct) =>
        {
            Assert.Equal(0u, await c.CommandAsync(NbdCommand.Write, NbdCommandFlags.None, 0, (ulong)disk.Length, disk, ct));
            await c.DisconnectAsync(ct);
        });
        Assert.Null(rig.FilterError);
        Assert.Equal(0, rig.Stats.BlocksElided);
        Assert.Equal(8, rig.Stats.BlocksForwarded);
        Assert.Equal(FakeRig.MapOf(disk, BlockSize).ComputeDigest(), rig.Recorded.ComputeDigest());
    }

    private sealed record Op(int Kind, int Block, int Count, int Offset, int Length, bool SameAsRetained, int Seed);

    [Fact]
    public async Task RandomSequencesEndWithTheTargetReadingLikeTheClientWrote()
    {
        const int blocks = 24;
        var genOp = Gen.Select(Gen.Int[0, 9], Gen.Int[0, blocks - 1], Gen.Int[1, 4], Gen.Int[0, BlockSize - 1], Gen.Int[1, 3 * BlockSize], Gen.Bool, Gen.Int)
            .Select((k, b, n, o, l, same, s) => new Op(k, b, n, o, l, same, s));
        var gen = Gen.Select(Gen.Int[0, 2], Gen.Int, genOp.Array[1, 30]);
        await gen.SampleAsync(async (styleIndex, seed, ops) =>
        {
            var style = (NbdHeaderStyle)styleIndex;
            byte[] retainedDisk = Random(blocks * BlockSize, seed);
            for (int b = 0; b < blocks; b += 5)
                Array.Clear(retainedDisk, b * BlockSize, BlockSize);
            byte[] model = (byte[])retainedDisk.Clone();
            var server = Server((byte[])retainedDisk.Clone(), style);
            var retained = FakeRig.MapOf(retainedDisk, BlockSize);
            var rig = await FakeRig.RunAsync(server, retained, Options(style), async (c, ct) =>
            {
                // Batches of up to three requests on disjoint ranges are in flight together.
                var inFlight = new List<(int Start, int End)>();
                int sent = 0;
                foreach (var op in ops)
                {
                    int start, length;
                    if (op.Kind < 4 || op.Kind == 7)
                    {
                        start = op.Block * BlockSize;
                        length = Math.Min(op.Count, blocks - op.Block) * BlockSize;
                    }
                    else
                    {
                        start = Math.Min(op.Block * BlockSize + op.Offset, model.Length - 1);
                        length = Math.Min(op.Length, model.Length - start);
                    }
                    if (sent == 3 || inFlight.Any(r => r.Start < start + length && start < r.End) || op.Kind == 8)
                    {
                        for (; sent > 0; sent--)
                            Assert.Equal(0u, (await c.ReadReplyAsync(Memory<byte>.Empty, 0, ct)).Error);
                        inFlight.Clear();
                    }
                    switch (op.Kind)
                    {
                        case 0 or 1 or 2 or 4 or 5:
                            byte[] data = op.SameAsRetained ? retainedDisk.AsSpan(start, length).ToArray() : Random(length, op.Seed);
                            data.CopyTo(model, start);
                            await c.SendRequestAsync(NbdCommand.Write, NbdCommandFlags.None, (ulong)start, (ulong)length, data, ct);
                            break;
                        case 3 or 6 or 7:
                            Array.Clear(model, start, length);
                            await c.SendRequestAsync(NbdCommand.WriteZeroes, NbdCommandFlags.None, (ulong)start, (ulong)length, default, ct);
                            break;
                        case 8:
                            var back = new byte[length];
                            await c.ReadAsync((ulong)start, back, ct);
                            Assert.Equal(model.AsSpan(start, length).ToArray(), back);
                            continue;
                        default:
                            await c.SendRequestAsync(NbdCommand.Flush, NbdCommandFlags.None, 0, 0, default, ct);
                            break;
                    }
                    sent++;
                    inFlight.Add((start, start + length));
                }
                for (; sent > 0; sent--)
                    Assert.Equal(0u, (await c.ReadReplyAsync(Memory<byte>.Empty, 0, ct)).Error);
                await c.DisconnectAsync(ct);
            });
            Assert.Null(rig.ScriptError);
            Assert.Null(rig.FilterError);
            Assert.True(rig.Result!.CleanDisconnect);
            Assert.Equal(model, server.Disk);
            Assert.Empty(server.Violations);
            var truth = FakeRig.MapOf(server.Disk, BlockSize);
            for (long b = 0; b < blocks; b++)
            {
                if (rig.Recorded.TryGetHash(b, out var h))
                {
                    truth.TryGetHash(b, out var t);
                    Assert.Equal(t, h);
                }
            }
            Assert.Equal(rig.Recorded.ComputeDigest(), rig.Observed.ComputeDigest());
        }, iter: 80, threads: 1);
    }
}
