using System.Net.Sockets;
using BFMig.Transfer.Memory;
using BFMig.Transfer.Store;
using BFMig.Transfer.Wire;

namespace BFMig.Transfer.Tests;

/// <summary>Sender and receiver helpers in process, over unix sockets, with a captured stream standing in for QEMU.</summary>
public class EndToEndTests
{
    private sealed record Result(byte[] Delivered, TransferStats? Send, TransferStats? Receive, Exception? SendError, Exception? ReceiveError,
        bool PauseDelivered = false, DateTime DeliveredAt = default);

    private static async Task<Result> Run(byte[] stream, string? senderRoot, string? receiverRoot, Guid guest, StreamKind kind = StreamKind.Mig,
        IPeerAuthenticator? sa = null, IPeerAuthenticator? ra = null, Guid? receiverGuest = null, long receiverMaxRam = 0,
        Func<CancellationToken, Task>? awaitMain = null, int pauseAt = -1, int destinationGoesAwayAt = -1, Task? guestRuns = null, TimeSpan? commitWaitLimit = null, Action? onDelivered = null)
    {
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(60));
        var (qemuSrc, senderLocal) = await WireTests.Pair();
        var (senderPeer, receiverPeer) = await WireTests.Pair();
        var (receiverLocal, qemuDst) = await WireTests.Pair();
        var so = new TransferOptions { Kind = kind, StoreRoot = senderRoot, Guest = guest, PeerName = "hostB", Compression = CompressionMode.Zstd, Authenticator = sa ?? NoPeerAuthenticator.Instance, IdleTimeout = TimeSpan.FromSeconds(10), EndTimeout = TimeSpan.FromSeconds(5) };
        var ro = new TransferOptions { Kind = kind, StoreRoot = receiverRoot, MaxRamBytes = receiverMaxRam, Guest = receiverGuest ?? guest, Authenticator = ra ?? NoPeerAuthenticator.Instance, IdleTimeout = TimeSpan.FromSeconds(10), EndTimeout = TimeSpan.FromSeconds(5), AwaitMainChannel = awaitMain,
            GuestRuns = guestRuns, CommitWaitLimit = commitWaitLimit ?? MigReceiver.DefaultCommitWaitLimit };
        var send = Task.Run(() => TransferRunner.SendAsync(LocalConnection.FromSocket(senderLocal), senderPeer, so, cts.Token));
        var receive = Task.Run(() => TransferRunner.ReceiveAsync(receiverPeer, _ => Task.FromResult(LocalConnection.FromSocket(receiverLocal)), ro, cts.Token));
        long received = 0;
        bool pauseDelivered = false;
        // "Source QEMU": writes the stream, then closes its side. With pauseAt, it writes that much
        // and goes on only once the destination has it all, or after 5 s (as a multifd source
        // waits for its channels, which wait for the destination to take the main stream's EOS).
        var src = Task.Run(async () =>
        {
            using var s = new NetworkStream(qemuSrc, true);
            try
            {
                if (pauseAt >= 0)
                {
                    await s.WriteAsync(stream.AsMemory(0, pauseAt), cts.Token);
                    var until = DateTime.UtcNow + TimeSpan.FromSeconds(5);
                    while (Interlocked.Read(ref received) < pauseAt && DateTime.UtcNow < until)
                        await Task.Delay(10, cts.Token);
                    pauseDelivered = Interlocked.Read(ref received) >= pauseAt;
                }
                await s.WriteAsync(stream.AsMemory(Math.Max(pauseAt, 0)), cts.Token);
                qemuSrc.Shutdown(SocketShutdown.Send);
                await s.CopyToAsync(Stream.Null, cts.Token);
            }
            catch (IOException) { }
        });
        // "Destination QEMU": reads until EOF, then closes.
        var delivered = new MemoryStream();
        var deliveredAt = default(DateTime);
        var dst = Task.Run(async () =>
        {
            using var s = new NetworkStream(qemuDst, true);
            var buffer = new byte[64 << 10];
            try
            {
                // destinationGoesAwayAt: a destination QEMU that fails mid-load reads that much, then closes its socket.
                long limit = destinationGoesAwayAt < 0 ? long.MaxValue : destinationGoesAwayAt;
                int n;
                while (delivered.Length < limit
                       && (n = await s.ReadAsync(buffer.AsMemory(0, (int)Math.Min(buffer.Length, limit - delivered.Length)), cts.Token)) > 0)
                {
                    delivered.Write(buffer, 0, n);
                    Interlocked.Add(ref received, n);
                }
                deliveredAt = DateTime.UtcNow;
                onDelivered?.Invoke();
                if (destinationGoesAwayAt >= 0)
                    qemuDst.Close(0);
            }
            catch (IOException) { }
        });
        TransferStats? ss = null, rs = null;
        Exception? se = null, re = null;
        try { ss = await send; } catch (Exception e) { se = e; }
        senderLocal.Dispose();
        try { rs = await receive; } catch (Exception e) { re = e; }
        receiverLocal.Dispose();
        await Task.WhenAll(src, dst).WaitAsync(TimeSpan.FromSeconds(20));
        return new Result(delivered.ToArray(), ss, rs, se, re, pauseDelivered, deliveredAt);
    }

    /// <summary>
    /// A memory trip that fails midway (the destination QEMU went away while pages flowed) keeps
    /// both stores in step: the retry of the same trip still matches and elides every page the
    /// failed one did not leave in doubt (issue 13; before, both stores dropped to generation 0
    /// and the retry sent everything).
    /// </summary>
    [Fact]
    public async Task A_memory_trip_that_fails_midway_costs_its_retry_only_the_pages_in_doubt()
    {
        var s = Fixtures.Load("q72-pc-paused.bin");
        using var a = new TempDir();
        using var b = new TempDir();
        var guest = Guid.NewGuid();
        var first = await Run(s, a.Path, b.Path, guest);
        Assert.True(first.Send!.Committed);
        var failed = await Run(s, b.Path, a.Path, guest, destinationGoesAwayAt: s.Length / 3);
        Assert.NotNull(failed.ReceiveError);
        Assert.NotNull(failed.SendError);
        Assert.NotNull(failed.Receive?.MemDoubtAfter ?? failed.ReceiveError!.Message);
        using (var sa = MemoryStore.Open(a.Path, guest))
        using (var sb = MemoryStore.Open(b.Path, guest))
        {
            Assert.False(sa.Recovered || sb.Recovered);
            Assert.Equal(1UL, sa.State.Generation);
            Assert.Equal(sa.State.Digest, sb.State.Digest);
        }
        var retry = await Run(s, b.Path, a.Path, guest);
        Assert.Null(retry.SendError);
        Assert.Null(retry.ReceiveError);
        Assert.Equal(s, retry.Delivered);
        Assert.Equal("store-match", retry.Send!.Mode);
        Assert.Null(retry.Send.StoreUnused);
        Assert.Equal(first.Send.PagesFull, retry.Send.PagesElided + retry.Send.PagesFull + retry.Send.PagesReferenced + retry.Send.PagesDelta);
        Assert.InRange(retry.Send.PagesFull + retry.Send.PagesReferenced + retry.Send.PagesDelta, 0, retry.Send.MemDoubtPages);
        Assert.True(retry.Send.PagesElided > first.Send.PagesFull / 2, $"elided {retry.Send.PagesElided} of {first.Send.PagesFull}");
    }

    /// <summary>
    /// The store is a cache (issue 12, finding 8): a receiver whose store file system is full
    /// (a 64 KiB tmpfs; before, ENOSPC mid-stream dropped the migration with exit 4) carries the
    /// stream plain, delivers every byte, retains nothing and says why.
    /// </summary>
    [Fact]
    public async Task A_full_store_file_system_carries_the_stream_plain_and_says_why()
    {
        var s = Fixtures.Load("q10-pc-paused.bin");
        using var a = new TempDir();
        using var b = new TempDir();
        var root = Path.Combine(b.Path, "store");
        Directory.CreateDirectory(root);
        bool mounted = Environment.UserName == "root" && Mount(root);
        try
        {
            // Without root (no tmpfs), a guest larger than any disk stands in for the full file system.
            var r = await Run(s, a.Path, root, Guid.NewGuid(), receiverMaxRam: mounted ? 256L << 20 : long.MaxValue / 4);
            Assert.Null(r.SendError);
            Assert.Null(r.ReceiveError);
            Assert.Equal(s, r.Delivered);
            Assert.Equal("plain", r.Receive!.Mode);
            Assert.Contains("bytes free, this trip may write", r.Receive.StoreSkipped);
            Assert.False(r.Receive.Committed);
            Assert.Empty(Directory.EnumerateFileSystemEntries(root));
        }
        finally
        {
            if (mounted)
                System.Diagnostics.Process.Start("umount", root)!.WaitForExit();
        }
    }

    private static bool Mount(string at)
    {
        using var p = System.Diagnostics.Process.Start("mount", ["-t", "tmpfs", "-o", "size=64k", "bfmig-full-store", at])!;
        p.WaitForExit();
        return p.ExitCode == 0;
    }

    /// <summary>
    /// A migration cancelled in its RAM phase (QEMU closes the stream mid-way, as on `virsh
    /// domjobabort`): both helpers fail with the reason (a StreamCutException, exit 4 with the
    /// reason in the stats; before, both exited 0), yet both stores keep what was carried, in step,
    /// so the retry elides it.
    /// </summary>
    [Fact]
    public async Task A_stream_QEMU_cuts_in_its_RAM_phase_fails_both_helpers_and_keeps_the_stores_in_step()
    {
        var s = Fixtures.Load("q10-pc-paused.bin");
        using var a = new TempDir();
        using var b = new TempDir();
        var guest = Guid.NewGuid();
        var first = await Run(s, a.Path, b.Path, guest);
        Assert.Null(first.SendError);
        Assert.True(first.Send!.Committed);

        // A cut stream is a failed migration: no resume comes, and the receiver commits without waiting
        // for one (else the sender's end acknowledgement, 5 s here, would time out first).
        var cut = await Run(s[..(s.Length / 2)], b.Path, a.Path, guest, guestRuns: new TaskCompletionSource().Task, commitWaitLimit: TimeSpan.FromSeconds(30));
        Assert.True(cut.SendError is StreamCutException, $"sender: {cut.SendError}; receiver: {cut.ReceiveError}");
        Assert.True(cut.ReceiveError is StreamCutException, $"receiver: {cut.ReceiveError}");
        Assert.Contains("before its device state", cut.SendError!.Message);
        using (var sa = MemoryStore.Open(a.Path, guest))
        using (var sb = MemoryStore.Open(b.Path, guest))
        {
            Assert.False(sa.Recovered);
            Assert.Equal(2UL, sa.State.Generation);
            Assert.Equal(sa.State.Generation, sb.State.Generation);
            Assert.Equal(sa.State.Digest, sb.State.Digest);
            Assert.False(sa.State.SnapshotComplete);
        }

        var retry = await Run(s, b.Path, a.Path, guest);
        Assert.Null(retry.SendError);
        Assert.Null(retry.ReceiveError);
        Assert.Equal(s, retry.Delivered);
        Assert.Equal("store-match", retry.Send!.Mode);
        Assert.True(retry.Send.WireBytesOut * 4 < first.Send.WireBytesOut, $"{retry.Send.WireBytesOut} vs {first.Send.WireBytesOut}");
    }

    /// <summary>
    /// The receiver's store commits only once the guest runs on its host (bfmigd's signal,
    /// <see cref="MigReceiver.GuestRuns"/>), so its fsyncs stay off libvirt's before the resume;
    /// the destination QEMU has the whole stream before that, and nothing waits for the commit.
    /// Without the signal the commit starts at its limit, and the trip is still kept on both hosts.
    /// </summary>
    [Fact]
    public async Task The_receivers_store_commits_once_the_guest_runs_there_or_at_the_limit()
    {
        var s = Fixtures.Load("q10-pc-paused.bin");
        using var a = new TempDir();
        using var b = new TempDir();
        var guest = Guid.NewGuid();
        // "libvirt resumes the guest" 800 ms after the destination QEMU had the whole stream.
        var runs = new TaskCompletionSource();
        var signalledAt = default(DateTime);
        Task? resumed = null;
        var r1 = await Run(s, a.Path, b.Path, guest, guestRuns: runs.Task, commitWaitLimit: TimeSpan.FromSeconds(20),
            onDelivered: () => resumed = Task.Run(async () =>
            {
                await Task.Delay(800);
                signalledAt = DateTime.UtcNow;
                runs.SetResult();
            }));
        Assert.NotNull(resumed);
        await resumed;
        Assert.Null(r1.SendError);
        Assert.Null(r1.ReceiveError);
        Assert.Equal(s, r1.Delivered);
        Assert.True(r1.DeliveredAt < signalledAt, $"the destination had the stream at {r1.DeliveredAt:HH:mm:ss.fff}, the guest ran at {signalledAt:HH:mm:ss.fff}");
        Assert.InRange(r1.Receive!.CommitWaitSeconds, 0.6, 19);
        Assert.True(r1.Send!.Committed && r1.Receive.Committed);

        // No signal: committed at the limit, and the next trip matches.
        var never = new TaskCompletionSource().Task;
        var r2 = await Run(s, b.Path, a.Path, guest, guestRuns: never, commitWaitLimit: TimeSpan.FromMilliseconds(500));
        Assert.Null(r2.ReceiveError);
        Assert.Equal(s, r2.Delivered);
        Assert.Equal("store-match", r2.Send!.Mode);
        Assert.InRange(r2.Receive!.CommitWaitSeconds, 0.45, 5);
        Assert.True(r2.Send.Committed && r2.Receive.Committed);
        using var sa = MemoryStore.Open(a.Path, guest);
        using var sb = MemoryStore.Open(b.Path, guest);
        Assert.Equal(sa.State.Digest, sb.State.Digest);
        Assert.Equal(2UL, sa.State.Generation);
    }

    [Fact]
    public async Task Two_trips_over_sockets_deliver_exact_bytes_and_the_second_is_small()
    {
        var s = Fixtures.Load("q10-pc-paused.bin");
        using var a = new TempDir();
        using var b = new TempDir();
        var guest = Guid.NewGuid();
        var key = new PskPeerAuthenticator("2982d0a96af930d8eb0d7592f52f4015823dcad7a4ceaf6500cba5a322c465dc"u8);
        var r1 = await Run(s, a.Path, b.Path, guest, sa: key, ra: key);
        Assert.Null(r1.SendError);
        Assert.Null(r1.ReceiveError);
        Assert.Equal(s, r1.Delivered);
        Assert.Equal("store-full", r1.Send!.Mode);
        Assert.True(r1.Send.Committed && r1.Receive!.Committed);
        var r2 = await Run(s, b.Path, a.Path, guest, sa: key, ra: key);
        Assert.Null(r2.SendError);
        Assert.Equal(s, r2.Delivered);
        Assert.Equal("store-match", r2.Send!.Mode);
        Assert.Equal(2UL, r2.Send.Generation);
        Assert.True(r2.Send.WireBytesOut * 4 < r1.Send.WireBytesOut, $"{r2.Send.WireBytesOut} vs {r1.Send.WireBytesOut}");
        using var sa = MemoryStore.Open(a.Path, guest);
        using var sb = MemoryStore.Open(b.Path, guest);
        Assert.Equal(sa.State.Digest, sb.State.Digest);
    }

    /// <summary>
    /// A guest that tours A->B->C->A (issue 15): C never exchanged the guest with A, so the hello
    /// does not match, but A still holds its departure snapshot from the first trip. A offers its
    /// page index (keyed MACs) and C elides every page A still holds; the stream arrives exact,
    /// both stores commit the same digest, and the next trip between them matches.
    /// </summary>
    [Fact]
    public async Task An_arrival_from_a_host_the_receiver_never_exchanged_the_guest_with_is_coded_against_its_page_index()
    {
        var s = Fixtures.Load("q10-pc-paused.bin");
        using var a = new TempDir();
        using var b = new TempDir();
        using var c = new TempDir();
        var guest = Guid.NewGuid();
        var key = new PskPeerAuthenticator("2982d0a96af930d8eb0d7592f52f4015823dcad7a4ceaf6500cba5a322c465dc"u8);
        var ab = await Run(s, a.Path, b.Path, guest, sa: key, ra: key);
        var bc = await Run(s, b.Path, c.Path, guest, sa: key, ra: key);
        Assert.True(ab.Send!.Committed && bc.Send!.Committed, $"{ab.SendError} {bc.SendError}");
        Assert.Equal("store-full", bc.Send.Mode); // C held nothing: no index to offer

        var ca = await Run(s, c.Path, a.Path, guest, sa: key, ra: key);
        Assert.Null(ca.SendError);
        Assert.Null(ca.ReceiveError);
        Assert.Equal(s, ca.Delivered);
        Assert.Equal("store-index", ca.Send!.Mode);
        Assert.Equal("store-index", ca.Receive!.Mode);
        Assert.True(ca.Send.IndexPages > 0 && ca.Send.IndexPages == ca.Receive.IndexPages, $"index of {ca.Send.IndexPages} / {ca.Receive.IndexPages} pages");
        Assert.Equal(ab.Send.PagesFull, ca.Send.PagesElided);
        Assert.Equal(0, ca.Send.PagesFull);
        Assert.True(ca.Send.WireBytesOut * 4 < ab.Send.WireBytesOut, $"C->A moved {ca.Send.WireBytesOut} bytes, A->B {ab.Send.WireBytesOut}");
        Assert.True(ca.Send.Committed && ca.Receive.Committed);
        AssertStoresAgreeAndHoldWhatTheyIndex(a.Path, c.Path, guest);

        var ac = await Run(s, a.Path, c.Path, guest, sa: key, ra: key);
        Assert.Equal(s, ac.Delivered);
        Assert.Equal("store-match", ac.Send!.Mode);
    }

    /// <summary>
    /// A page of the receiver's snapshot changed behind its store's back (its index still names
    /// the old content) is left out of the index it offers, so the sender carries it: the arrival
    /// is exact, and the receiver holds the true page afterwards.
    /// </summary>
    [Fact]
    public async Task A_receiver_page_damaged_behind_its_store_is_left_out_of_its_index_and_carried()
    {
        var s = Fixtures.Load("q10-pc-paused.bin");
        using var a = new TempDir();
        using var b = new TempDir();
        using var c = new TempDir();
        var guest = Guid.NewGuid();
        var ab = await Run(s, a.Path, b.Path, guest);
        var bc = await Run(s, b.Path, c.Path, guest);
        Assert.True(ab.Send!.Committed && bc.Send!.Committed);
        string file;
        long offset;
        using (var sa = MemoryStore.Open(a.Path, guest))
        {
            var (block, page) = Enumerable.Range(0, sa.BlockCount).SelectMany(bl => Enumerable.Range(0, (int)sa.PageCount(bl)).Select(p => (bl, (long)p)))
                .First(x => sa.GetHash(x.bl, x.Item2) != sa.ZeroHash && sa.GetHash(x.bl, x.Item2) != UInt128.Zero);
            file = Path.Combine(a.Path, guest.ToString(), "mem", "b-" + System.IO.Hashing.XxHash64.HashToUInt64(System.Text.Encoding.UTF8.GetBytes(sa.BlockName(block))).ToString("x16") + ".pages");
            offset = page * 4096;
        }
        using (var f = new FileStream(file, FileMode.Open, FileAccess.Write))
        {
            f.Position = offset;
            f.Write(Enumerable.Repeat((byte)0x5a, 4096).ToArray());
        }
        var ca = await Run(s, c.Path, a.Path, guest);
        Assert.Null(ca.SendError);
        Assert.Null(ca.ReceiveError);
        Assert.Equal(s, ca.Delivered);
        Assert.Equal("store-index", ca.Send!.Mode);
        Assert.Equal(ab.Send.PagesFull - 1, ca.Send.PagesElided);
        Assert.Equal(1, ca.Send.PagesFull);
        AssertStoresAgreeAndHoldWhatTheyIndex(a.Path, c.Path, guest);
    }

    private static void AssertStoresAgreeAndHoldWhatTheyIndex(string root1, string root2, Guid guest)
    {
        using var s1 = MemoryStore.Open(root1, guest);
        using var s2 = MemoryStore.Open(root2, guest);
        Assert.Equal(s1.State.Digest, s2.State.Digest);
        Assert.Equal(s1.State.Generation, s2.State.Generation);
        foreach (var st in new[] { s1, s2 })
            for (int bl = 0; bl < st.BlockCount; bl++)
                for (long p = 0; p < st.PageCount(bl); p++)
                    if (st.GetHash(bl, p) is var h && h != UInt128.Zero)
                        Assert.Equal(st.Hash(st.Page(bl, p)), h);
    }

    [Fact]
    public async Task A_receiver_whose_store_lies_about_its_digest_cannot_complete_a_wrong_migration()
    {
        var s = Fixtures.Load("q72-pc-paused.bin");
        using var a = new TempDir();
        using var b = new TempDir();
        var guest = Guid.NewGuid();
        var r1 = await Run(s, a.Path, b.Path, guest);
        Assert.Null(r1.SendError);
        // A's store changes behind its back (a page rewritten, index kept consistent), yet state.json keeps the old
        // digest: A will claim to hold what B believes, and B will elide that page.
        using (var sb = MemoryStore.Open(a.Path, guest))
        {
            sb.BeginTrip(new QemuStreamParserProbe(s).Blocks, sb.State.Seed, keep: true, buildLocator: false);
            var (block, page) = Enumerable.Range(0, sb.BlockCount).SelectMany(bl => Enumerable.Range(0, (int)sb.PageCount(bl)).Select(p => (bl, (long)p)))
                .First(x => sb.GetHash(x.bl, x.Item2) != sb.ZeroHash && sb.GetHash(x.bl, x.Item2) != UInt128.Zero);
            var garbage = new byte[4096];
            new Random(3).NextBytes(garbage);
            sb.Put(block, page, garbage, sb.Hash(garbage));
            string digest = sb.State.Digest;
            ulong gen = sb.State.Generation;
            sb.Commit(gen, "hostA", snapshotComplete: true);
            sb.State.Digest = digest;
            BFMig.Native.Linux.DurableFile.WriteAtomically(Path.Combine(a.Path, guest.ToString(), "mem", "state.json"),
                System.Text.Json.JsonSerializer.SerializeToUtf8Bytes(sb.State, StoreJsonContext.Default.StoreState));
        }
        // The guest's memory is unchanged; B sends it back to A believing A holds its (corrupted) view.
        var r2 = await Run(s, b.Path, a.Path, guest);
        Assert.IsType<StoreOutOfStepException>(r2.ReceiveError);
        Assert.Contains("the stream rebuilt here is not the sender's", r2.ReceiveError!.Message);
        Assert.NotNull(r2.SendError);
        Assert.True(r2.Delivered.Length < s.Length, "the destination got the whole stream");
        Assert.True(r2.Delivered.Length <= OpaqueFrom(s), $"the destination got {r2.Delivered.Length - OpaqueFrom(s)} bytes of device state before the digest check");
        using var sa = MemoryStore.Open(a.Path, guest);
        Assert.Equal(0UL, sa.State.Generation);
        for (int bl = 0; bl < sa.BlockCount; bl++)
        {
            for (long p = 0; p < sa.PageCount(bl); p++)
            {
                var h = sa.GetHash(bl, p);
                if (h != UInt128.Zero) Assert.Equal(sa.Hash(sa.Page(bl, p)), h);
            }
        }
    }

    /// <summary>
    /// With multifd (issue 13) the source QEMU 7.2 sends the main stream's next bytes only after
    /// the destination has taken its EOS (the destination's channels wait for it, the source waits
    /// for its channels): every byte the source has written must reach the destination without
    /// waiting for a later one. A receiver that held back the stream's last byte until End stalled
    /// such trips until the 120 s idle timeout. Checked on a first trip and on a return trip (elided).
    /// </summary>
    [Fact]
    public async Task Every_byte_of_a_paused_stream_reaches_the_destination_before_the_source_goes_on()
    {
        var s = Fixtures.Load("q72-pc-paused.bin");
        int pauseAt = RecordBoundaryInRam(s);
        using var a = new TempDir();
        using var b = new TempDir();
        var guest = Guid.NewGuid();
        var r1 = await Run(s, a.Path, b.Path, guest, pauseAt: pauseAt);
        Assert.Null(r1.SendError);
        Assert.Null(r1.ReceiveError);
        Assert.True(r1.PauseDelivered, $"the destination did not get the first {pauseAt} bytes while the source waited");
        Assert.Equal(s, r1.Delivered);
        Assert.Equal("store-full", r1.Send!.Mode);
        var r2 = await Run(s, b.Path, a.Path, guest, pauseAt: pauseAt);
        Assert.Null(r2.SendError);
        Assert.Null(r2.ReceiveError);
        Assert.True(r2.PauseDelivered, $"the destination did not get the first {pauseAt} bytes of the return trip while the source waited");
        Assert.Equal(s, r2.Delivered);
        Assert.Equal("store-match", r2.Send!.Mode);
    }

    /// <summary>A record boundary half way to the device state (QEMU flushes at records: at an EOS, with multifd).</summary>
    private static int RecordBoundaryInRam(byte[] stream)
    {
        int half = OpaqueFrom(stream) / 2;
        var parser = new QemuStreamParser();
        int pos = 0;
        while (pos < half && parser.TryRead(stream.AsSpan(pos), true, out var seg)) pos += seg.Length;
        Assert.False(parser.IsOpaque);
        return pos;
    }

    /// <summary>Stream offset of the first byte the parser does not understand (the device state).</summary>
    private static int OpaqueFrom(byte[] stream)
    {
        var parser = new QemuStreamParser();
        int pos = 0;
        while (parser.TryRead(stream.AsSpan(pos), true, out var seg))
        {
            if (seg.Kind == SegmentKind.OpaqueFromHere) return pos;
            pos += seg.Length;
        }
        return pos;
    }

    [Fact]
    public async Task Wrong_guest_is_refused_with_a_reason()
    {
        using var a = new TempDir();
        using var b = new TempDir();
        var r = await Run(Fixtures.Load("q72-pc-paused.bin"), a.Path, b.Path, Guid.NewGuid(), receiverGuest: Guid.NewGuid());
        Assert.IsType<PeerProtocolException>(r.SendError);
        Assert.Contains("peer refused the stream: this receiver is for guest", r.SendError!.Message);
        Assert.Empty(r.Delivered);
    }

    /// <summary>
    /// A multifd channel (issue 13): carried exactly, its receiver waits for the main channel
    /// before it connects to its QEMU (and fails, delivering nothing, when that wait fails), the
    /// sender's stats say what the channel carried; the main stream never waits.
    /// </summary>
    [Fact]
    public async Task A_multifd_channel_waits_for_the_main_channel_and_is_carried_exactly()
    {
        var page = new byte[4096];
        new Random(13).NextBytes(page);
        byte[] channel = [.. new MultifdInit(3, Guid.NewGuid()).Encode(),
            .. new MultifdPacket(0, 1, "pc.ram", [0x1000, 0x2000], []).EncodeHeader(), .. page, .. page,
            .. new MultifdPacket(MultifdFormat.FlagSync, 2, "pc.ram", [0x9000], []).EncodeHeader(), .. page];
        using var a = new TempDir();
        using var b = new TempDir();
        int waits = 0;
        var r = await Run(channel, a.Path, b.Path, Guid.NewGuid(), awaitMain: _ =>
        {
            Interlocked.Increment(ref waits);
            return Task.CompletedTask;
        });
        Assert.Null(r.SendError);
        Assert.Null(r.ReceiveError);
        Assert.Equal(channel, r.Delivered);
        Assert.Equal(1, waits);
        Assert.Equal("plain", r.Send!.Mode);
        Assert.Equal("multifd channel 3: carried byte for byte, 2 packets, 3 pages, 0 zero pages (multifd pages are not elided yet)", r.Send.Multifd);

        var refused = await Run(channel, a.Path, b.Path, Guid.NewGuid(), awaitMain: _ => throw new TimeoutException("main channel never came"));
        Assert.IsType<TimeoutException>(refused.ReceiveError);
        Assert.Empty(refused.Delivered);

        var main = await Run(Fixtures.Load("q72-pc-paused.bin"), a.Path, b.Path, Guid.NewGuid(), awaitMain: _ => throw new InvalidOperationException("the main stream waited"));
        Assert.Null(main.ReceiveError);
        Assert.Null(main.Send!.Multifd);
    }

    [Fact]
    public async Task Non_qemu_bytes_and_nbd_are_tunnelled_exactly()
    {
        var data = new byte[3 << 20];
        new Random(9).NextBytes(data.AsSpan(0, 1 << 20));
        using var a = new TempDir();
        using var b = new TempDir();
        var r = await Run(data, a.Path, b.Path, Guid.NewGuid());
        Assert.Null(r.SendError);
        Assert.Equal("plain", r.Send!.Mode);
        Assert.Equal(data, r.Delivered);
        // Without stores (--no-store) the nbd kind is a plain tunnel; with stores it is an NBD conversation (DiskPathTests).
        var n = await Run(data, null, null, Guid.NewGuid(), kind: StreamKind.Nbd);
        Assert.Null(n.SendError);
        Assert.Null(n.ReceiveError);
        Assert.Equal(data, n.Delivered);
        Assert.True(n.Send!.WireBytesOut < data.Length / 2);
    }

    [Fact]
    public async Task Receiver_rejects_frames_out_of_order_garbage_ops_and_an_early_close()
    {
        var cases = new (Func<FrameWriter, Task> Act, string Message)[]
        {
            (async w => await w.WriteAsync(FrameType.MigData, new byte[] { 0x40, 0, 0, 0, 1, 9 }, false, default), "expected a hello, got a MigData frame"),
        };
        foreach (var (act, message) in cases)
        {
            var (senderPeer, receiverPeer) = await WireTests.Pair();
            using var d = new TempDir();
            var o = new TransferOptions { StoreRoot = d.Path, Guest = Guid.NewGuid(), IdleTimeout = TimeSpan.FromSeconds(5) };
            var recv = TransferRunner.ReceiveAsync(receiverPeer, _ => throw new InvalidOperationException("must not connect"), o, default);
            using var ns = new NetworkStream(senderPeer, true);
            using var w = new FrameWriter(ns);
            await act(w);
            var e = await Assert.ThrowsAsync<PeerProtocolException>(() => recv.WaitAsync(TimeSpan.FromSeconds(20)));
            Assert.Contains(message, e.Message);
        }
        // After a good hello: data before the block list, garbage, and a close before End.
        var bad = new (byte[] Ops, string Message)[]
        {
            ([0x03, 0, 0], "page op before the block list"),
            ([0x7f], "unknown op 0x7f"),
            ([0x40, 0xff, 0xff, 0xff, 0xff], "RAW of 4294967295 bytes overruns the frame"),
            ([0x41, 1, 6, (byte)'p', (byte)'c', (byte)'.', (byte)'r', (byte)'a', (byte)'m', 0x80, 0x80, 0x04, 0x02, 0, 100], "page 100 beyond block 'pc.ram'"),
            ([0x41, 1, 6, (byte)'p', (byte)'c', (byte)'.', (byte)'r', (byte)'a', (byte)'m', 0x80, 0x80, 0x04, 0x00, 0, 1], "elided page 1 of block 0 is not retained here"),
            ([0x41, 1, 6, (byte)'p', (byte)'c', (byte)'.', (byte)'r', (byte)'a', (byte)'m', 0x80, 0x80, 0x04, 0x42, 5], "ELIDE_RUN of 5 pages after page -1"),
            ([0x40, 0, 0, 0, 1, 7], "peer closed the connection before the end of the stream"),
        };
        foreach (var (ops, message) in bad)
        {
            var guest = Guid.NewGuid();
            using var d = new TempDir();
            var (senderPeer, receiverPeer) = await WireTests.Pair();
            var (receiverLocal, qemuDst) = await WireTests.Pair();
            using var __ = qemuDst;
            var o = new TransferOptions { StoreRoot = d.Path, Guest = guest, IdleTimeout = TimeSpan.FromSeconds(5) };
            var recv = TransferRunner.ReceiveAsync(receiverPeer, _ => Task.FromResult(LocalConnection.FromSocket(receiverLocal)), o, default);
            var ns = new NetworkStream(senderPeer, true);
            using var r = new FrameReader(ns, TimeSpan.FromSeconds(5));
            using var w = new FrameWriter(ns);
            await Handshake.ClientAsync(r, w, NoPeerAuthenticator.Instance, new Hello(StreamKind.Mig, true, guest, 0, new byte[16], 1, new byte[32], "x"), default);
            await w.WriteAsync(FrameType.MigDoubt, MemoryDoubt.None.Encode(), false, default);
            await w.WriteAsync(FrameType.MigData, ops, false, default);
            if (message.StartsWith("peer closed", StringComparison.Ordinal)) ns.Dispose();
            var e = await Assert.ThrowsAnyAsync<PeerProtocolException>(() => recv.WaitAsync(TimeSpan.FromSeconds(20)));
            Assert.Contains(message, e.Message);
            ns.Dispose();
            using var store = MemoryStore.Open(d.Path, guest);
            Assert.Equal(0UL, store.State.Generation);
        }
    }
}

/// <summary>Parses a stream just to learn its block list.</summary>
internal sealed class QemuStreamParserProbe
{
    public QemuStreamParserProbe(byte[] stream)
    {
        var p = new BFMig.Transfer.Memory.QemuStreamParser();
        int pos = 0;
        while (p.Blocks.Count == 0 || !p.IsOpaque)
        {
            if (!p.TryRead(stream.AsSpan(pos), true, out var seg)) break;
            pos += seg.Length;
        }
        Blocks = p.Blocks;
    }

    public IReadOnlyList<BFMig.Transfer.Memory.RamBlockInfo> Blocks { get; }
}
