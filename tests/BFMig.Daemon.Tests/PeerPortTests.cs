using System.Net.Sockets;
using System.Net;
using BFMig.Daemon.Logging;
using BFMig.Daemon.Tests.Infrastructure;
using BFMig.Native.Systemd;
using BFMig.Transfer.Wire;
using Xunit.Abstractions;

namespace BFMig.Daemon.Tests;

/// <summary>
/// The peer port under attack (issue 12, findings 1 and 6): two real daemons on loopback, and a
/// hostile client on another loopback address (127.0.0.2) that knows the peer names and the
/// guest's UUID (both travel in clear) but not the key.
/// </summary>
public sealed class PeerPortTests(ITestOutputHelper output) : IAsyncLifetime
{
    private const string TestGuestUuid = "6695eb01-f6a4-8304-79aa-97f2502e193f";
    private static readonly IPAddress Attacker = IPAddress.Parse("127.0.0.2");
    private readonly PrivateBus _busA = new();
    private readonly PrivateBus _busB = new();
    private readonly List<Socket> _held = [];
    private DaemonHost _a = null!;
    private DaemonHost _b = null!;

    public Task InitializeAsync()
    {
        _b = DaemonHost.Start(_busB, DaemonHost.Ini("hostb", "hosta", 9));
        _a = DaemonHost.Start(_busA, DaemonHost.Ini("hosta", "hostb", _b.Daemon.PeerPort));
        return Task.CompletedTask;
    }

    public async Task DisposeAsync()
    {
        foreach (var s in _held)
            s.Dispose();
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
    public async Task A_valid_looking_hello_for_a_guest_this_host_does_not_expect_starts_no_helper_and_opens_no_store()
    {
        // Guest "test" exists in libvirt here, and hosta is a configured peer: before the fix that was enough for a helper and the store's lock.
        using var s = await ConnectAsync();
        await s.SendAsync(HelloFrame(Guid.Parse(TestGuestUuid), "hosta"), SocketFlags.None);
        Assert.Equal(0, await ReceiveUntilClosedAsync(s));
        await Tools.UntilAsync(() => _b.Log.Contains("no incoming migration of guest " + TestGuestUuid, StringComparison.Ordinal), "the refusal in B's log");
        Assert.DoesNotContain("transfer 1:", _b.Log);
        Assert.False(Directory.Exists(Path.Combine(_b.Options.StateDirectory, TestGuestUuid, "mem")), "a store was created for a refused stream");
    }

    [Fact]
    public async Task A_version_probe_is_answered_with_this_protocol_and_routes_nothing()
    {
        var peer = new Configuration.PeerOptions("hostb", "127.0.0.1", _b.Daemon.PeerPort, "test:///default");
        Assert.Null(await Transparent.PeerProbe.WhyNotAsync(peer, TimeSpan.FromSeconds(5), CancellationToken.None));
        // A probe frame with a wrong magic is refused like any malformed first frame.
        using var s = await ConnectAsync();
        var bad = VersionProbe.Encode(FrameCodec.ProtocolVersion);
        bad[FrameCodec.HeaderLength] = (byte)'X';
        await s.SendAsync(bad, SocketFlags.None);
        Assert.Equal(0, await ReceiveUntilClosedAsync(s));
        await Tools.UntilAsync(() => _b.Log.Contains("probe magic 58464D50 is not BFMP", StringComparison.Ordinal), "the refusal in B's log");
    }

    /// <summary>
    /// The hook could not reach B's daemon in time (restarting, loaded host) and left its own
    /// marker of the incoming migration: that announces it too, so the stream is not refused
    /// (the migration would otherwise fail because of BFMig). Seen in the lab with a daemon that
    /// restarted as the trip began.
    /// </summary>
    [Fact]
    public async Task The_hooks_own_incoming_marker_announces_a_migration_when_the_daemon_missed_the_call()
    {
        var marker = Path.Combine(_b.Options.RuntimeDirectory, "incoming", TestGuestUuid);
        Directory.CreateDirectory(Path.GetDirectoryName(marker)!);
        File.WriteAllText(marker, DateTime.UtcNow.ToString("O"));
        using var s = await ConnectAsync();
        await s.SendAsync(HelloFrame(Guid.Parse(TestGuestUuid), "hosta"), SocketFlags.None);
        // Routed to a receiving helper now (which then waits for the proof this forged hello cannot give).
        await Tools.UntilAsync(() => _b.Log.Contains("transfer 1:", StringComparison.Ordinal), "a receiving helper for the announced guest");
        Assert.DoesNotContain("no incoming migration of guest " + TestGuestUuid, _b.Log);
        // A stale marker (older than the hook's 5 minutes) announces nothing.
        File.SetLastWriteTimeUtc(marker, DateTime.UtcNow - TimeSpan.FromMinutes(6));
        using var s2 = await ConnectAsync();
        await s2.SendAsync(HelloFrame(Guid.Parse(TestGuestUuid), "hosta"), SocketFlags.None);
        await Tools.UntilAsync(() => _b.Log.Contains("no incoming migration of guest " + TestGuestUuid, StringComparison.Ordinal), "the refusal of a stale marker");
        // A fresh marker in a directory others could write to announces nothing either (the hook's rule).
        File.SetLastWriteTimeUtc(marker, DateTime.UtcNow);
        var dir = Path.GetDirectoryName(marker)!;
        File.SetUnixFileMode(dir, File.GetUnixFileMode(dir) | UnixFileMode.OtherWrite);
        int refusals = CountOf(_b.Log, "no incoming migration of guest " + TestGuestUuid);
        using var s3 = await ConnectAsync();
        await s3.SendAsync(HelloFrame(Guid.Parse(TestGuestUuid), "hosta"), SocketFlags.None);
        await Tools.UntilAsync(() => CountOf(_b.Log, "no incoming migration of guest " + TestGuestUuid) > refusals, "the refusal of a marker others could have planted");
    }

    private static int CountOf(string text, string part)
    {
        int count = 0;
        for (int i = text.IndexOf(part, StringComparison.Ordinal); i >= 0; i = text.IndexOf(part, i + part.Length, StringComparison.Ordinal))
            count++;
        return count;
    }

    [Fact]
    public async Task Idle_connections_and_unauthenticated_hellos_cannot_keep_a_real_migration_out()
    {
        _b.AnnounceIncoming("test", TestGuestUuid);
        var port = _b.Daemon.PeerPort;
        // 40 idle connections (the lab's attack) and 12 hellos that will never send their proof.
        for (int i = 0; i < 40; i++)
            _held.Add(await ConnectAsync());
        for (int i = 0; i < 12; i++)
        {
            var s = await ConnectAsync();
            _held.Add(s);
            try
            {
                await s.SendAsync(HelloFrame(Guid.Parse(TestGuestUuid), "hosta"), SocketFlags.None);
            }
            catch (SocketException)
            {
                // Already refused and closed: as it should be.
            }
        }
        await Task.Delay(500);
        Assert.True(_b.Daemon.Transfers!.Active <= Transfers.TransferManager.HandshakeSlots,
            $"{_b.Daemon.Transfers.Active} helpers for connections that proved nothing");
        // Nobody holds the guest's store for a hello without a proof.
        var lockPath = Path.Combine(_b.Options.StateDirectory, TestGuestUuid, "mem", "lock");
        if (File.Exists(lockPath))
            new FileStream(lockPath, FileMode.Open, FileAccess.ReadWrite, FileShare.None).Dispose();

        await RealMigrationGoesThroughAsync();

        // The unauthenticated helpers are gone by the handshake deadline, and the flood cost B's log a bounded number of lines.
        await Tools.UntilAsync(() => _b.Daemon.Transfers.Active == 0, "the unauthenticated helpers to end",
            Transfers.TransferManager.HandshakeDeadline.TotalSeconds + 5);
        var rejections = _b.Log.Split('\n').Count(l => l.Contains("rejected peer connection", StringComparison.Ordinal));
        Assert.InRange(rejections, 1, 2 * 10);
    }

    /// <summary>
    /// Idle connections from several addresses that are no configured peer's (each within its own
    /// per-address limit) hold at most half of the pending slots together, so the real peer's
    /// streams still find one.
    /// </summary>
    [Fact]
    public async Task Idle_connections_from_many_stranger_addresses_cannot_take_every_pending_slot()
    {
        _b.AnnounceIncoming("test", TestGuestUuid);
        int held = 0;
        foreach (var address in new[] { "127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5" })
        {
            for (int i = 0; i < Transfers.PeerListener.MaxPendingPerSource; i++)
            {
                var s = await ConnectAsync(IPAddress.Parse(address));
                _held.Add(s);
                held++;
            }
        }
        Assert.Equal(Transfers.PeerListener.MaxPendingHellos, held);
        await Task.Delay(300);
        // Those over the strangers' share were closed at once.
        int closed = 0;
        foreach (var s in _held)
            if (s.Poll(0, SelectMode.SelectRead) && s.Available == 0)
                closed++;
        Assert.Equal(held - Transfers.PeerListener.MaxPendingFromStrangers, closed);
        await RealMigrationGoesThroughAsync();
        Assert.Contains("too many connections from addresses of no configured peer", _b.Log, StringComparison.Ordinal);
    }

    // The real migration A -> B goes through, byte for byte.
    private async Task RealMigrationGoesThroughAsync()
    {
        var stream = StreamFixtures.Load("q72-pc-paused.bin.zst");
        using var destination = new IncomingQemu(Path.Combine(_b.Options.RuntimeDirectory, "hostb", "test.mig"));
        var sourcePath = Path.Combine(_a.Options.RuntimeDirectory, "hostb", "test.mig");
        await Tools.UntilAsync(() => File.Exists(sourcePath), "A's socket for guest test");
        using (var source = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified))
        {
            await source.ConnectAsync(new UnixDomainSocketEndPoint(sourcePath));
            await source.SendAsync(stream, SocketFlags.None);
            source.Shutdown(SocketShutdown.Send);
            using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(60));
            while (await source.ReceiveAsync(new byte[4096], SocketFlags.None, cts.Token) > 0)
            {
            }
        }
        var arrived = await destination.Received.WaitAsync(TimeSpan.FromSeconds(60));
        Assert.True(stream.AsSpan().SequenceEqual(arrived), $"the destination got {arrived.Length} bytes, not the {stream.Length} the source sent");
    }

    [Fact]
    public async Task A_peer_chosen_name_with_a_newline_and_a_priority_prefix_is_logged_escaped()
    {
        using var s = await ConnectAsync();
        await s.SendAsync(HelloFrame(Guid.Parse(TestGuestUuid), "mallory\n<0>forged emergency"), SocketFlags.None);
        await ReceiveUntilClosedAsync(s);
        await Tools.UntilAsync(() => _b.Log.Contains("forged emergency", StringComparison.Ordinal), "the refusal in B's log");
        var log = _b.Log;
        Assert.Contains(@"mallory\x0a<0>forged emergency", log);
        Assert.DoesNotContain("\n<0>", log);
    }

    [Fact]
    public void Escaping_keeps_harmless_text_and_neutralizes_control_characters_and_fake_escapes()
    {
        Assert.Equal("hosta", LogText.Escape("hosta"));
        Assert.Equal(@"a\x0d\x0ab\x1b[31m\\x0a\u2028", LogText.Escape("a\r\nb\u001b[31m\\x0a\u2028"));
        var longText = LogText.Escape(new string('x', 10_000));
        Assert.True(longText.Length < LogText.MaxLength + 40, $"{longText.Length} characters kept of 10000");
        Assert.EndsWith("(9488 more characters)", longText);
    }

    [Fact]
    public void The_rate_limiter_lets_a_burst_through_then_counts_what_it_held_back()
    {
        var clock = new Clock();
        var limiter = new LogRateLimiter(3, TimeSpan.FromSeconds(10), clock);
        long suppressed;
        for (int i = 0; i < 3; i++)
            Assert.True(limiter.TryAcquire(out suppressed));
        for (int i = 0; i < 100; i++)
            Assert.False(limiter.TryAcquire(out _));
        clock.Now += TimeSpan.FromSeconds(10);
        Assert.True(limiter.TryAcquire(out suppressed));
        Assert.Equal(100, suppressed);
        Assert.True(limiter.TryAcquire(out suppressed));
        Assert.Equal(0, suppressed);
    }

    private async Task<Socket> ConnectAsync(IPAddress? from = null)
    {
        var s = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        s.Bind(new IPEndPoint(from ?? Attacker, 0));
        await s.ConnectAsync(IPAddress.Loopback, _b.Daemon.PeerPort);
        return s;
    }

    private static async Task<int> ReceiveUntilClosedAsync(Socket s)
    {
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(10));
        try
        {
            return await s.ReceiveAsync(new byte[64], SocketFlags.None, cts.Token);
        }
        catch (SocketException e) when (e.SocketErrorCode == SocketError.ConnectionReset)
        {
            return 0;
        }
    }

    private static byte[] HelloFrame(Guid guest, string sender)
    {
        var hello = new Hello(StreamKind.Mig, true, guest, 0, new byte[16], 1, new byte[32], sender).Encode();
        var frame = new byte[FrameCodec.HeaderLength + hello.Length];
        FrameCodec.WriteHeader(frame, FrameType.Hello, FrameCodecKind.None, hello.Length);
        hello.CopyTo(frame, FrameCodec.HeaderLength);
        return frame;
    }

    private sealed class Clock : TimeProvider
    {
        public DateTimeOffset Now { get; set; } = DateTimeOffset.UnixEpoch;

        public override DateTimeOffset GetUtcNow() => Now;
    }
}

/// <summary>Issue 12, finding 11: a pre-shared key that others can read is refused, saying how to fix it.</summary>
public sealed class PskFileModeTests
{
    [Fact]
    public void A_key_readable_by_group_or_others_is_refused_naming_the_fix()
    {
        var path = Path.GetTempFileName();
        try
        {
            DaemonHost.WritePsk(path);
            Assert.NotNull(PskPeerAuthenticator.FromFile(path));
            File.SetUnixFileMode(path, UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.GroupRead | UnixFileMode.OtherRead);
            var e = Assert.Throws<PeerAuthenticationException>(() => PskPeerAuthenticator.FromFile(path));
            Assert.Contains("mode 0644", e.Message);
            Assert.Contains($"chmod 0600 {path}", e.Message);
        }
        finally
        {
            File.Delete(path);
        }
    }

    /// <summary>
    /// bfmig.conf(5) asks for 32 random bytes, and a recorded handshake lets anyone test guesses
    /// offline: a shorter key, a password (text that is no hex or base64), or hex or base64 that
    /// stands for repeating bytes, is refused by the one rule bfmigd checks at start, `bfmig
    /// doctor` reports and every helper applies, saying how to make a key.
    /// </summary>
    [Theory]
    [InlineData("0123456789abcdef0123456789abcdef", "stand for 16 bytes")]
    [InlineData("correct horse battery staple and more", "is no key")]
    [InlineData("Tr0ub4dor&3Tr0ub4dor&3Tr0ub4dor&3Tr0ub4dor&3", "is no key")]
    [InlineData("passwordpasswordpasswordpasswordpasswordpassword", "is no key")]
    [InlineData("password\npassword\npassword\npassword\npassword\npassword", "is no key")]
    [InlineData("70617373776f726470617373776f726470617373776f726470617373776f726470617373776f726470617373776f7264", "is no key")]
    [InlineData("passwörtpasswörtpasswörtpasswörtpasswört", "is no key")]
    [InlineData("0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef", "repeat too much")]
    [InlineData("aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaab", "repeat too much")]
    public void A_key_too_short_or_too_repetitive_to_be_random_is_refused_naming_how_to_make_one(string key, string why)
    {
        var path = Path.GetTempFileName();
        try
        {
            File.WriteAllText(path, key + "\n", new System.Text.UTF8Encoding(false));
            File.SetUnixFileMode(path, UnixFileMode.UserRead | UnixFileMode.UserWrite);
            var e = Assert.Throws<PeerAuthenticationException>(() => PskPeerAuthenticator.FromFile(path));
            Assert.Contains(why, e.Message);
            Assert.Contains("head -c 32 /dev/urandom", e.Message);
            Assert.Equal(e.Message, PskPeerAuthenticator.KeyFileProblem(path));
            Assert.Throws<ArgumentException>(() => new PskPeerAuthenticator(System.Text.Encoding.UTF8.GetBytes(key)));
        }
        finally
        {
            File.Delete(path);
        }
    }

    /// <summary>
    /// What the README's command makes is a key, every time, and so are 32 random bytes as they
    /// are or in base64 (either alphabet, padded or not), with a newline or without.
    /// </summary>
    [Fact]
    public void Random_keys_as_hex_base64_or_raw_bytes_are_taken()
    {
        for (int i = 0; i < 200; i++)
        {
            var bytes = System.Security.Cryptography.RandomNumberGenerator.GetBytes(32);
            var urlSafe = Convert.ToBase64String(bytes).TrimEnd('=').Replace('+', '-').Replace('/', '_');
            foreach (var content in new[] { System.Text.Encoding.ASCII.GetBytes(Convert.ToHexStringLower(bytes)), System.Text.Encoding.ASCII.GetBytes(Convert.ToBase64String(bytes)),
                         System.Text.Encoding.ASCII.GetBytes(urlSafe), bytes })
            {
                Assert.Null(PskPeerAuthenticator.KeyProblem(content));
                Assert.Null(PskPeerAuthenticator.KeyProblem([.. content, (byte)'\n']));
            }
        }
    }

    /// <summary>
    /// The key file is judged as it was opened: a FIFO is refused without waiting for a writer, a
    /// file far larger than a key by its size, unread, and one another user owns (who could change
    /// it) by its owner.
    /// </summary>
    [Fact]
    public async Task A_key_file_that_is_no_regular_file_of_this_user_or_is_far_too_large_is_refused_without_reading_it()
    {
        var dir = Directory.CreateTempSubdirectory("bfmig-psk-").FullName;
        try
        {
            var fifo = Path.Combine(dir, "fifo");
            Tools.Run("mkfifo", "-m", "0600", fifo);
            var read = Task.Run(() => PskPeerAuthenticator.KeyFileProblem(fifo));
            Assert.Contains("not a regular file", await read.WaitAsync(TimeSpan.FromSeconds(10)));

            var large = Path.Combine(dir, "large");
            using (var f = new FileStream(large, FileMode.Create))
                f.SetLength(1L << 30);
            File.SetUnixFileMode(large, UnixFileMode.UserRead | UnixFileMode.UserWrite);
            Assert.Contains("not a key file", PskPeerAuthenticator.KeyFileProblem(large));

            var others = Path.Combine(dir, "others");
            DaemonHost.WritePsk(others);
            Assert.Null(PskPeerAuthenticator.KeyFileProblem(others));
            Tools.Run("chown", "65534", others);
            Assert.Contains("belongs to user 65534", PskPeerAuthenticator.KeyFileProblem(others));
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }
}
