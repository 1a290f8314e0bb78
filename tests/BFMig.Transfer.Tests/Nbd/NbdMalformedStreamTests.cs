using System.Buffers.Binary;
using BFMig.Tests.Shared.Nbd;
using BFMig.Transfer.Disk.Nbd;
using BFMig.Transfer.Disk;
using Xunit;

namespace BFMig.Transfer.Tests.Nbd;

/// <summary>Broken peers make the filter fail with a clear error, promptly, without touching the map.</summary>
public sealed class NbdMalformedStreamTests
{
    private static async Task<Exception?> RunRawAsync(Func<Stream, Stream, CancellationToken, Task> script)
    {
        var (clientSide, filterClient) = await SocketPair.CreateAsync();
        var (filterUp, serverSide) = await SocketPair.CreateAsync();
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(10));
        var recorder = new DiskBlockMap(1 << 20, 4096);
        var filter = new NbdSenderFilter();
        var run = Task.Run(() => filter.RunAsync(filterClient, filterUp, new DiskBlockMap(1 << 20, 4096), recorder, cts.Token));
        try
        {
            await script(clientSide, serverSide, cts.Token);
            await run.WaitAsync(cts.Token);
            return null;
        }
        catch (Exception e) when (e is not OperationCanceledException || run.IsFaulted)
        {
            return run.IsFaulted ? run.Exception!.InnerException : e;
        }
        finally
        {
            Assert.True(recorder.LastTripUnclean);
            foreach (var s in new[] { clientSide, filterClient, filterUp, serverSide })
                await s.DisposeAsync();
        }
    }

    private static byte[] Greeting()
    {
        var g = new byte[NbdHandshake.GreetingLength];
        NbdHandshake.WriteGreeting(g, NbdHandshakeFlags.FixedNewstyle | NbdHandshakeFlags.NoZeroes);
        return g;
    }

    [Fact]
    public async Task TruncatedGreeting()
    {
        var e = await RunRawAsync(async (client, server, ct) =>
        {
            await server.WriteAsync(Greeting().AsMemory(0, 10), ct);
            server.Close();
        });
        var p = Assert.IsType<NbdProtocolException>(e);
        Assert.Contains("stream ended while waiting for the server greeting", p.Message, StringComparison.Ordinal);
    }

    [Fact]
    public async Task BadGreetingMagic()
    {
        var e = await RunRawAsync(async (client, server, ct) =>
        {
            var g = Greeting();
            g[0] ^= 0xff;
            await server.WriteAsync(g, ct);
        });
        Assert.Contains("is not NBDMAGIC", Assert.IsType<NbdProtocolException>(e).Message, StringComparison.Ordinal);
    }

    [Fact]
    public async Task ClientOptionWithBadMagicOrAbsurdLength()
    {
        foreach (var (option, expected) in new[]
        {
            (Convert.FromHexString("0000000000000000" + "00000007" + "00000000"), "client option at byte 4: magic"),
            (Convert.FromHexString("49484156454F5054" + "00000007" + "FFFFFFF0"), "data length 4294967280 exceeds"),
        })
        {
            var e = await RunRawAsync(async (client, server, ct) =>
            {
                await server.WriteAsync(Greeting(), ct);
                await client.WriteAsync(new byte[] { 0, 0, 0, 3 }, ct);
                await client.WriteAsync(option, ct);
            });
            Assert.Contains(expected, Assert.IsType<NbdProtocolException>(e).Message, StringComparison.Ordinal);
        }
    }

    [Fact]
    public async Task OptionReplyForAnotherOption()
    {
        var e = await RunRawAsync(async (client, server, ct) =>
        {
            await server.WriteAsync(Greeting(), ct);
            await client.WriteAsync(new byte[] { 0, 0, 0, 3 }, ct);
            var option = new byte[16];
            NbdHandshake.WriteOptionHeader(option, NbdOption.StructuredReply, 0);
            await client.WriteAsync(option, ct);
            var reply = new byte[20];
            NbdHandshake.WriteOptionReplyHeader(reply, NbdOption.Go, NbdOptionReplyType.Ack, 0);
            await server.WriteAsync(reply, ct);
        });
        Assert.Contains("but the client asked for StructuredReply", Assert.IsType<NbdProtocolException>(e).Message, StringComparison.Ordinal);
    }

    [Theory]
    [InlineData("256095130000000100000000000000010000000000000000", "FFFFFFFF", "payload length 4294967295 exceeds")]
    [InlineData("2560951300000063000000000000000100000000000000000000000000000000", null, "unknown command type 99")]
    [InlineData("12345678000000010000000000000001000000000000000000000000", "00000000", "request magic 0x12345678")]
    [InlineData("21e41c71000000000000000000000001000000000000000000000000", "00000000", "does not match the negotiated header style")]
    [InlineData("2560951300000008000000000000000100000000000000000000000000000000", null, "Resize is not supported")]
    public async Task MalformedRequestsAfterTheHandshake(string header, string? length, string expected)
    {
        byte[] raw = Convert.FromHexString(header + (length ?? ""));
        byte[] disk = new byte[1 << 20];
        var server = new FakeNbdServer(disk);
        var rig = await FakeRig.RunAsync(server, new DiskBlockMap((ulong)disk.Length, 4096), new NbdClientOptions(), async (c, ct) =>
            await c.SendRawAsync(raw, ct), timeoutSeconds: 10);
        var e = Assert.IsType<NbdProtocolException>(rig.FilterError);
        Assert.Contains(expected, e.Message, StringComparison.Ordinal);
        Assert.True(rig.Recorded.LastTripUnclean);
        Assert.Equal(new byte[1 << 20], disk);
    }

    [Fact]
    public async Task UpstreamClosingMidTransmissionFailsTheStream()
    {
        var e = await RunRawAsync(async (client, server, ct) =>
        {
            await server.WriteAsync(Greeting(), ct);
            await client.WriteAsync(new byte[] { 0, 0, 0, 3 }, ct);
            var go = new byte[16 + 6];
            NbdHandshake.WriteOptionHeader(go, NbdOption.Go, 6);
            await client.WriteAsync(go, ct);
            var info = new byte[20 + 12];
            NbdHandshake.WriteOptionReplyHeader(info, NbdOption.Go, NbdOptionReplyType.Info, 12);
            BinaryPrimitives.WriteUInt64BigEndian(info.AsSpan(22), 1 << 20);
            var ack = new byte[20];
            NbdHandshake.WriteOptionReplyHeader(ack, NbdOption.Go, NbdOptionReplyType.Ack, 0);
            await server.WriteAsync(info, ct);
            await server.WriteAsync(ack, ct);
            var write = new byte[28 + 4096];
            NbdRequest.WriteHeader(write, false, NbdCommandFlags.None, NbdCommand.Write, 1, 0, 4096);
            await client.WriteAsync(write, ct);
            var buffer = new byte[28 + 4096 + 1000];
            int got = 0;
            while (got < 20 + 12 + 20)
                got += await client.ReadAsync(buffer, ct);
            got = 0;
            while (got < 28 + 4096)
                got += await server.ReadAsync(buffer.AsMemory(got), ct);
            server.Close();
        });
        Assert.Contains("request(s) outstanding", Assert.IsType<NbdProtocolException>(e).Message, StringComparison.Ordinal);
    }

    [Fact]
    public void ObserverRejectsGarbageAndStaysFailed()
    {
        var observer = new NbdStreamObserver(new DiskBlockMap(1 << 20, 4096));
        var e = Assert.Throws<NbdProtocolException>(() => observer.OnServerBytes(new byte[NbdHandshake.GreetingLength]));
        Assert.Contains("server greeting at byte 0: magic 0x0000000000000000 is not NBDMAGIC", e.Message, StringComparison.Ordinal);
        Assert.Throws<NbdProtocolException>(() => observer.OnClientBytes(new byte[] { 0, 0, 0, 1 }));
        var map = new DiskBlockMap(1 << 20, 4096);
        observer.Report(map);
        Assert.True(map.LastTripUnclean);
        Assert.Equal(0, map.KnownCount);
    }

    [Fact]
    public void ObserverRejectsAReplyToNoRequest()
    {
        var observer = new NbdStreamObserver(new DiskBlockMap(1 << 20, 4096));
        var greeting = new byte[NbdHandshake.GreetingLength];
        NbdHandshake.WriteGreeting(greeting, NbdHandshakeFlags.FixedNewstyle | NbdHandshakeFlags.NoZeroes);
        observer.OnServerBytes(greeting);
        observer.OnClientBytes([0, 0, 0, 3]);
        var exportName = new byte[NbdHandshake.OptionHeaderLength];
        NbdHandshake.WriteOptionHeader(exportName, NbdOption.ExportName, 0);
        observer.OnClientBytes(exportName);
        var info = new byte[10];
        BinaryPrimitives.WriteUInt64BigEndian(info, 1 << 20);
        observer.OnServerBytes(info);
        Assert.Equal(1UL << 20, observer.ExportSize);
        var reply = new byte[NbdReplyHeader.SimpleLength];
        NbdReplyHeader.WriteSimple(reply, 0, 0x1234);
        var e = Assert.Throws<NbdProtocolException>(() => observer.OnServerBytes(reply));
        Assert.Contains("server at byte 36: reply for unknown cookie 0x1234", e.Message, StringComparison.Ordinal);
    }

    // A server that declares an export of 2^62 bytes (more blocks than any map holds) in the
    // NBD_INFO_EXPORT of its GO reply; found by the nbd fuzz target (tests/BFMig.Fuzz).
    private const ulong AbsurdExportSize = 1UL << 62;

    private static byte[] ClientGo()
    {
        var b = new byte[4 + NbdHandshake.OptionHeaderLength + 6];
        BinaryPrimitives.WriteUInt32BigEndian(b, (uint)(NbdClientFlags.FixedNewstyle | NbdClientFlags.NoZeroes));
        // GO with an empty export name and no information requests.
        NbdHandshake.WriteOptionHeader(b.AsSpan(4), NbdOption.Go, 6);
        return b;
    }

    private static byte[] ServerAbsurdExport()
    {
        var b = new byte[NbdHandshake.GreetingLength + NbdHandshake.OptionReplyHeaderLength + 12 + NbdHandshake.OptionReplyHeaderLength];
        int at = 0;
        Greeting().CopyTo(b, 0);
        at += NbdHandshake.GreetingLength;
        NbdHandshake.WriteOptionReplyHeader(b.AsSpan(at), NbdOption.Go, NbdOptionReplyType.Info, 12);
        at += NbdHandshake.OptionReplyHeaderLength;
        BinaryPrimitives.WriteUInt16BigEndian(b.AsSpan(at), (ushort)NbdInfoType.Export);
        BinaryPrimitives.WriteUInt64BigEndian(b.AsSpan(at + 2), AbsurdExportSize);
        at += 12;
        NbdHandshake.WriteOptionReplyHeader(b.AsSpan(at), NbdOption.Go, NbdOptionReplyType.Ack, 0);
        return b;
    }

    [Fact]
    public async Task ExportTooLargeForAMapFailsWithTheProtocolError()
    {
        // Before the fix the filter's report of the trip threw ArgumentOutOfRangeException from
        // DiskBlockMap.BeginTrip over the declared size, hiding the protocol error.
        var e = await RunRawAsync(async (client, server, ct) =>
        {
            await server.WriteAsync(ServerAbsurdExport(), ct);
            await client.WriteAsync(ClientGo(), ct);
        });
        var p = Assert.IsType<NbdProtocolException>(e);
        Assert.Contains($"NBD export of {AbsurdExportSize} bytes has more than {DiskBlockMap.MaxBlockCount} blocks", p.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void ObserverReportsAnExportTooLargeForAMapAsUnknownAndUnclean()
    {
        var retained = new DiskBlockMap(1 << 20, 4096);
        retained.Set(0, UInt128.One);
        var observer = new NbdStreamObserver(retained);
        observer.OnClientBytes(ClientGo());
        var e = Assert.Throws<NbdProtocolException>(() => observer.OnServerBytes(ServerAbsurdExport()));
        Assert.Contains("blocks", e.Message, StringComparison.Ordinal);
        // Before the fix Report threw ArgumentOutOfRangeException (the receiving helper's end of trip).
        var observed = new DiskBlockMap(0, 4096);
        observer.Report(observed);
        Assert.True(observed.LastTripUnclean);
        Assert.Equal(0, observed.KnownCount);
        Assert.Equal((ulong)(1 << 20), observed.ImageSize);
    }
}
