using System.Net.Sockets;
using System.Security.Cryptography;
using System.Text.Json;
using BFMig.Daemon.Tests.Infrastructure;
using BFMig.Tests.Shared;
using Tmds.DBus.Protocol;
using BFMig.Native.Libvirt;
using BFMig.Transfer.Wire;
using BFMig.Transfer;
using Xunit.Abstractions;

namespace BFMig.Daemon.Tests;

/// <summary>
/// Two daemons on loopback (A and B: separate buses, state and runtime directories, data ports,
/// one pre-shared key) carry a real captured QEMU 7.2 migration stream from a fake source QEMU
/// on A's explicit-mode socket to a listener on B's own socket path, through two real
/// bfmig-transfer helpers. Only libvirt's side is the test driver: it cannot migrate, so the
/// departure/arrival events are replayed by hand.
/// </summary>
public sealed class DataPathTests(ITestOutputHelper output) : IAsyncLifetime
{
    private const string TestGuestUuid = "6695eb01-f6a4-8304-79aa-97f2502e193f";
    private readonly PrivateBus _busA = new();
    private readonly PrivateBus _busB = new();
    private DaemonHost _a = null!;
    private DaemonHost _b = null!;

    public Task InitializeAsync()
    {
        _b = DaemonHost.Start(_busB, WithHelper(DaemonHost.Ini("hostb", "hosta", 9)));
        _a = DaemonHost.Start(_busA, WithHelper(DaemonHost.Ini("hosta", "hostb", _b.Daemon.PeerPort)));
        return Task.CompletedTask;
    }

    /// <summary>The helper is <see cref="DaemonHost.TestHelper"/> (BFMIG_TEST_TRANSFER_HELPER may name another build).</summary>
    private static string WithHelper(string ini) => ini;

    public async Task DisposeAsync()
    {
        try
        {
            if (_a is not null)
            {
                output.WriteLine("---- A ----\n" + _a.Log);
                await _a.DisposeAsync();
            }
            if (_b is not null)
            {
                output.WriteLine("---- B ----\n" + _b.Log);
                await _b.DisposeAsync();
            }
        }
        finally
        {
            _busA.Dispose();
            _busB.Dispose();
        }
    }

    [Fact]
    public async Task A_real_QEMU_stream_arrives_byte_for_byte_and_both_hosts_record_the_trip()
    {
        var stream = StreamFixtures.Load("q72-pc-paused.bin.zst");
        Assert.Equal("QEVM"u8.ToArray(), stream[..4]);

        var finished = new TaskCompletionSource<(string Guest, string Peer, bool Ok, string Message)>(TaskCreationOptions.RunContinuationsAsynchronously);
        var progress = new System.Collections.Concurrent.ConcurrentQueue<(string Stream, ulong Sent, ulong Saved)>();
        using var watcher = TestBus.Open(_busA.Address);
        using var onFinished = watcher.WatchManager("TransferFinished", static (m, _) =>
        {
            var r = m.GetBodyReader();
            return (r.ReadString(), r.ReadString(), r.ReadBool(), r.ReadString());
        }, f => finished.TrySetResult(f));
        using var onProgress = watcher.WatchManager("TransferProgress", static (m, _) =>
        {
            var r = m.GetBodyReader();
            r.ReadString();
            r.ReadString();
            return (r.ReadString(), r.ReadUInt64(), r.ReadUInt64());
        }, progress.Enqueue);

        // B's hook announced the incoming migration (libvirt runs `migrate begin` there first).
        _b.AnnounceIncoming("test", TestGuestUuid);
        // The destination QEMU: listens on B's own socket path, as `-incoming unix:` would.
        var destinationPath = Path.Combine(_b.Options.RuntimeDirectory, "hostb", "test.mig");
        using var destination = new IncomingQemu(destinationPath);

        // The source QEMU: connects to A's socket for peer hostb, as `--migrateuri unix://...` makes it.
        var sourcePath = Path.Combine(_a.Options.RuntimeDirectory, "hostb", "test.mig");
        await Tools.UntilAsync(() => File.Exists(sourcePath), "A's socket for guest test");
        using (var source = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified))
        {
            await source.ConnectAsync(new UnixDomainSocketEndPoint(sourcePath));
            await source.SendAsync(stream, SocketFlags.None);
            source.Shutdown(SocketShutdown.Send);
            using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(60));
            // QEMU keeps the socket open until the far side is done; EOF from A's helper ends it.
            while (await source.ReceiveAsync(new byte[4096], SocketFlags.None, cts.Token) > 0)
            {
            }
        }

        var arrived = await destination.Received.WaitAsync(TimeSpan.FromSeconds(60));
        Assert.Equal(stream.Length, arrived.Length);
        Assert.True(stream.AsSpan().SequenceEqual(arrived), "the destination got different bytes than the source sent");

        var (guest, peer, ok, message) = await finished.Task.WaitAsync(TimeSpan.FromSeconds(30));
        Assert.True(ok, message);
        Assert.Equal(("test", "hostb"), (guest, peer));
        Assert.Contains("memory:", message);
        await Tools.UntilAsync(() => !progress.IsEmpty, "a TransferProgress signal", 5);
        // The helper's last report is its final count.
        var (streamName, sent, _) = progress.Last();
        Assert.Equal("memory", streamName);
        Assert.True(sent > 0 && sent < (ulong)stream.Length * 2, $"{sent} bytes on the wire for a {stream.Length}-byte stream");

        // Both helpers used the stores under the daemons' state directories and agreed on the trip.
        var stateA = ReadState(_a, TestGuestUuid);
        var stateB = ReadState(_b, TestGuestUuid);
        output.WriteLine($"A: {stateA}\nB: {stateB}");
        Assert.Equal(stateA.GetProperty("generation").GetUInt64(), stateB.GetProperty("generation").GetUInt64());
        Assert.True(stateA.GetProperty("generation").GetUInt64() > 0);
        Assert.Equal(stateA.GetProperty("digest").GetString(), stateB.GetProperty("digest").GetString());

        // No helper records where the guest is: A holds the departure as pending (still here) until
        // libvirt confirms it, and B the arrival, so nothing has to be taken back if QEMU fails now.
        await Tools.UntilAsync(() => _a.Daemon.Store.ReadLocation(Guid.Parse(TestGuestUuid)).Record is { Place: GuestPlace.Here, Pending: PendingTrip.Departing, PendingPeer: "hostb" },
            "A to hold the departure as pending", 30);
        Assert.Equal("here", _a.Daemon.Store.Read(Guid.Parse(TestGuestUuid))!.Location);
        Assert.Equal(PendingTrip.Arriving, _b.Daemon.Store.ReadLocation(Guid.Parse(TestGuestUuid)).Record?.Pending);

        // libvirt would now report the departure on A and the arrival on B (the test driver cannot migrate).
        _a.Daemon.OnEvent(new LibvirtLifecycleDomainEvent("test", TestGuestUuid, LibvirtLifecycleEvent.Stopped, 3));
        _b.Daemon.OnEvent(new LibvirtLifecycleDomainEvent("test", TestGuestUuid, LibvirtLifecycleEvent.Resumed, 1));
        await _a.Daemon.FlushStateAsync().WaitAsync(TimeSpan.FromSeconds(30));
        await _b.Daemon.FlushStateAsync().WaitAsync(TimeSpan.FromSeconds(30));
        var recordA = _a.Daemon.Store.Read(Guid.Parse(TestGuestUuid))!;
        var recordB = _b.Daemon.Store.Read(Guid.Parse(TestGuestUuid))!;
        Assert.Equal(("away", "hostb", "test"), (recordA.Location, recordA.State!.Peer, recordA.Name));
        Assert.Equal(("here", "hosta", "test"), (recordB.Location, recordB.State!.Peer, recordB.Name));
        Assert.Equal(stateA.GetProperty("digest").GetString(), recordA.State.Digest);
        Assert.True(recordA.MemoryBytes > 0, "A retains the memory it sent");

        // Now A refuses to boot its stale copy, naming where the guest runs.
        var refusal = _a.Daemon.HookEvent("test", "prepare", "begin", "-", $"<domain><name>test</name><uuid>{TestGuestUuid}</uuid></domain>");
        Assert.False(refusal.Allow);
        Assert.Contains("host hostb", refusal.Message);
        Assert.True(_b.Daemon.HookEvent("test", "prepare", "begin", "-", $"<domain><name>test</name><uuid>{TestGuestUuid}</uuid></domain>").Allow);

        // Forget on A: the guard lets go.
        _a.Daemon.Forget("test");
        Assert.True(_a.Daemon.HookEvent("test", "prepare", "begin", "-", $"<domain><name>test</name><uuid>{TestGuestUuid}</uuid></domain>").Allow);
    }

    private static JsonElement ReadState(DaemonHost host, string uuid) =>
        JsonDocument.Parse(File.ReadAllBytes(Path.Combine(host.Options.StateDirectory, uuid, "mem", "state.json"))).RootElement.Clone();

    [Fact]
    public async Task Garbage_unknown_guests_and_unknown_senders_are_turned_away_with_a_logged_reason()
    {
        var port = _b.Daemon.PeerPort;
        // Garbage whose first byte names no frame type (random bytes would name one now and then: 13 of 256).
        var garbage = RandomNumberGenerator.GetBytes(300);
        garbage[0] = 0xee;
        await AssertClosedAsync(port, garbage);
        _b.AnnounceIncoming("test", TestGuestUuid);
        await AssertClosedAsync(port, HelloFrame(Guid.NewGuid(), "hosta"));
        await AssertClosedAsync(port, HelloFrame(Guid.Parse(TestGuestUuid), "mallory"));
        // The daemon may close a connection a moment before it writes the line saying why.
        string[] expected = ["rejected peer connection from 127.0.0.1", "unknown frame type", "no incoming migration of guest", "sender 'mallory' is not a configured peer"];
        var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(10);
        while (DateTime.UtcNow < deadline && !expected.All(_b.Log.Contains))
            await Task.Delay(50);
        var log = _b.Log;
        foreach (var line in expected)
            Assert.Contains(line, log);
        Assert.Equal(0, _b.Daemon.Transfers!.Active);
    }

    private static byte[] HelloFrame(Guid guest, string sender)
    {
        var hello = new Hello(StreamKind.Mig, true, guest, 0, new byte[16], 1, new byte[32], sender).Encode();
        var frame = new byte[FrameCodec.HeaderLength + hello.Length];
        FrameCodec.WriteHeader(frame, FrameType.Hello, FrameCodecKind.None, hello.Length);
        hello.CopyTo(frame, FrameCodec.HeaderLength);
        return frame;
    }

    private static async Task AssertClosedAsync(int port, byte[] payload)
    {
        using var socket = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        await socket.ConnectAsync("127.0.0.1", port);
        await socket.SendAsync(payload, SocketFlags.None);
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(10));
        try
        {
            var n = await socket.ReceiveAsync(new byte[64], SocketFlags.None, cts.Token);
            Assert.Equal(0, n);
        }
        catch (SocketException e) when (e.SocketErrorCode == SocketError.ConnectionReset)
        {
            // Closed with unread data pending: a reset is just as final.
        }
    }
}
