using System.Net;
using System.Net.Sockets;
using BFMig.Daemon.Checkpoints;
using BFMig.Daemon.Tests.Infrastructure;
using BFMig.Native.Libvirt;
using BFMig.Transfer.Wire;

namespace BFMig.Daemon.Tests;

/// <summary>
/// Checkpoint metadata across migrations: ordering and parsing, the control exchange between
/// daemons (real sockets, real PSK handshake), and redefinition through libvirt's test driver
/// (<c>test:///default</c>, which keeps checkpoint metadata like the QEMU driver).
/// </summary>
public sealed class CheckpointTests
{
    private const string TestGuestUuid = "6695eb01-f6a4-8304-79aa-97f2502e193f";

    private static CheckpointRecord Cp(string name, string? parent, long time) =>
        CheckpointRecord.Parse($"""
            <domaincheckpoint><name>{name}</name>{(parent is null ? "" : $"<parent><name>{parent}</name></parent>")}
            <creationTime>{time}</creationTime><disks><disk name='vda' checkpoint='bitmap' bitmap='{name}'/><disk name='vdb' checkpoint='no'/></disks></domaincheckpoint>
            """);

    [Fact]
    public void Parse_reads_name_parent_time_and_bitmap_disks()
    {
        var c = Cp("c2", "c1", 1795449571);
        Assert.Equal(("c2", "c1", 1795449571L), (c.Name, c.Parent, c.CreationTime));
        Assert.Equal([new CheckpointDisk("vda", "c2")], c.Disks);
        Assert.Null(Cp("root", null, 1).Parent);
    }

    [Theory]
    [InlineData("<domaincheckpoint><name>x</name>", "malformed")]
    [InlineData("<domainsnapshot><name>x</name></domainsnapshot>", "<domainsnapshot>")]
    [InlineData("<domaincheckpoint><parent><name>a</name></parent></domaincheckpoint>", "no <name>")]
    [InlineData("<domaincheckpoint><name>x</name><creationTime>soon</creationTime></domaincheckpoint>", "'soon' is not a number")]
    [InlineData("<!DOCTYPE d [<!ENTITY e 'x'>]><domaincheckpoint><name>&e;</name></domaincheckpoint>", "malformed")]
    public void Parse_names_what_is_wrong(string xml, string expected)
    {
        var e = Assert.Throws<CheckpointSetException>(() => CheckpointRecord.Parse(xml));
        Assert.Contains(expected, e.Message);
    }

    [Fact]
    public void Parents_come_first_whatever_order_libvirt_listed()
    {
        // c1 <- c2 <- c4, c1 <- c3 (a branch), r2 a second root; given children first.
        CheckpointRecord[] listed = [Cp("c4", "c2", 40), Cp("c3", "c1", 30), Cp("c2", "c1", 20), Cp("r2", null, 25), Cp("c1", null, 10)];
        var ordered = CheckpointOrder.ParentsFirst(listed).Select(c => c.Name).ToList();
        Assert.Equal(["c1", "c2", "r2", "c3", "c4"], ordered);
        foreach (var c in listed.Where(c => c.Parent is not null))
            Assert.True(ordered.IndexOf(c.Parent!) < ordered.IndexOf(c.Name), $"{c.Parent} must come before {c.Name}");
    }

    [Fact]
    public void A_missing_parent_makes_a_root_and_loops_and_duplicates_are_refused()
    {
        Assert.Equal(["orphan", "kid"], CheckpointOrder.ParentsFirst([Cp("kid", "orphan", 2), Cp("orphan", "gone", 1)]).Select(c => c.Name));
        var loop = Assert.Throws<CheckpointSetException>(() => CheckpointOrder.ParentsFirst([Cp("a", "b", 1), Cp("b", "a", 2), Cp("c", null, 3)]));
        Assert.Contains("a, b are their own ancestors", loop.Message);
        var twice = Assert.Throws<CheckpointSetException>(() => CheckpointOrder.ParentsFirst([Cp("a", null, 1), Cp("a", null, 2)]));
        Assert.Contains("a appears twice", twice.Message);
    }

    [Fact]
    public void Document_round_trips_and_garbage_is_named()
    {
        var snapshot = new CheckpointSnapshot(TestGuestUuid, "hosta", 1700000000, [Cp("c1", null, 1).Xml]);
        var back = CheckpointExchange.Decode(CheckpointExchange.Encode(snapshot));
        Assert.Equal((snapshot.Guest, snapshot.Source, snapshot.TakenAtUnixSeconds), (back.Guest, back.Source, back.TakenAtUnixSeconds));
        Assert.Equal(snapshot.Checkpoints, back.Checkpoints);
        Assert.Contains("not valid JSON", Assert.Throws<CheckpointSetException>(() => CheckpointExchange.Decode("{\"guest\":"u8)).Message);
        Assert.Contains("lacks", Assert.Throws<CheckpointSetException>(() => CheckpointExchange.Decode("{\"guest\":\"x\"}"u8)).Message);
    }

    [Fact]
    public async Task Exchange_delivers_the_document_and_a_wrong_key_delivers_nothing()
    {
        var key = new PskPeerAuthenticator("d6717ea04526c3497f3fbe83910bbaf698ae24ff467b74ed125a968c8ce0d749"u8);
        var wrong = new PskPeerAuthenticator("20a43ef89350399ef31a5369ba8698647934d9744a4db3c82485dfe2446811df"u8);
        var guest = Guid.Parse(TestGuestUuid);
        var snapshot = new CheckpointSnapshot(TestGuestUuid, "hosta", 1700000000, [Cp("c1", null, 1).Xml, Cp("c2", "c1", 2).Xml]);
        using var listener = new TcpListener(IPAddress.Loopback, 0);
        listener.Start();
        var port = ((IPEndPoint)listener.LocalEndpoint).Port;

        var stored = new List<(string Sender, CheckpointSnapshot Snapshot)>();
        async Task<Exception?> ServeOne(IPeerAuthenticator auth)
        {
            using var socket = await listener.AcceptSocketAsync();
            await using var stream = new NetworkStream(socket, ownsSocket: false);
            try
            {
                await CheckpointExchange.ServeAsync(stream, auth, (hello, s) =>
                {
                    stored.Add((hello.SenderName, s));
                    return s.Checkpoints.Count > 2 ? "too many for this test" : null;
                }, TimeSpan.FromSeconds(10), CancellationToken.None);
                return null;
            }
            catch (Exception e)
            {
                return e;
            }
        }

        var server = ServeOne(key);
        await CheckpointExchange.SendAsync("127.0.0.1", port, key, "hosta", guest, snapshot, TimeSpan.FromSeconds(10), CancellationToken.None);
        Assert.Null(await server);
        var (sender, got) = Assert.Single(stored);
        Assert.Equal("hosta", sender);
        Assert.Equal(snapshot.Checkpoints, got.Checkpoints);

        server = ServeOne(wrong);
        await Assert.ThrowsAsync<PeerAuthenticationException>(() =>
            CheckpointExchange.SendAsync("127.0.0.1", port, key, "hosta", guest, snapshot, TimeSpan.FromSeconds(10), CancellationToken.None));
        await server;
        Assert.Single(stored);

        server = ServeOne(key);
        var refused = await Assert.ThrowsAsync<PeerAbortedException>(() => CheckpointExchange.SendAsync("127.0.0.1", port, key, "hosta", guest,
            snapshot with { Checkpoints = [.. snapshot.Checkpoints, Cp("c3", "c2", 3).Xml] }, TimeSpan.FromSeconds(10), CancellationToken.None));
        Assert.Contains("too many for this test", refused.Message);
        Assert.IsType<CheckpointSetException>(await server);

        server = ServeOne(key);
        var otherGuest = await Assert.ThrowsAsync<PeerAbortedException>(() => CheckpointExchange.SendAsync("127.0.0.1", port, key, "hosta",
            Guid.NewGuid(), snapshot, TimeSpan.FromSeconds(10), CancellationToken.None));
        Assert.Contains($"document names guest {TestGuestUuid}", otherGuest.Message);
        await server;
    }

    /// <summary>
    /// The whole destination path of a real daemon: its peer listener routes a Control hello to the
    /// keeper, which stores the document; the resumed/migrated event then redefines the checkpoints
    /// (parents first, whatever order they were sent in) in libvirt, replacing stale metadata.
    /// </summary>
    [Fact]
    public async Task Daemon_receives_checkpoints_and_redefines_them_on_arrival()
    {
        using var bus = new PrivateBus();
        await using var host = DaemonHost.Start(bus, DaemonHost.Ini("hostb", "hosta", 9));
        using var libvirt = LibvirtConnection.Open("test:///default");
        using var domain = libvirt.LookupDomainByUuid(TestGuestUuid);
        DeleteAll(domain);
        try
        {
            // What the source had: c1 <- c2 <- c3; read it as the source daemon does, then forget it here.
            foreach (var name in new[] { "c1", "c2", "c3" })
                domain.CreateCheckpoint($"<domaincheckpoint><name>{name}</name></domaincheckpoint>").Dispose();
            var source = CheckpointKeeper.ReadCheckpoints(domain, Guid.Parse(TestGuestUuid), "hosta", DateTimeOffset.UtcNow);
            DeleteAll(domain);
            domain.CreateCheckpoint("<domaincheckpoint><name>stale</name></domaincheckpoint>").Dispose();

            var shuffled = source with { Checkpoints = [.. source.Checkpoints.Reverse()] };
            host.AnnounceIncoming("test", TestGuestUuid);
            await CheckpointExchange.SendAsync("127.0.0.1", host.Daemon.PeerPort, PskPeerAuthenticator.FromFile(Path.Combine(host.Root, "psk")),
                "hosta", Guid.Parse(TestGuestUuid), shuffled, TimeSpan.FromSeconds(10), CancellationToken.None);
            var statusPath = Path.Combine(host.Options.StateDirectory, TestGuestUuid, "checkpoints", "status.json");
            Assert.True(File.Exists(Path.Combine(host.Options.StateDirectory, TestGuestUuid, "checkpoints", "pending.json")));

            host.Daemon.OnEvent(new LibvirtLifecycleDomainEvent("test", TestGuestUuid, LibvirtLifecycleEvent.Resumed, 1));
            await Tools.UntilAsync(() => File.Exists(statusPath), "status.json after the arrival");

            var parents = domain.ListAllCheckpoints().ToDictionary(c => c.Name, c =>
            {
                using (c)
                using (var p = c.GetParent())
                    return p?.Name;
            });
            Assert.Equal(new Dictionary<string, string?> { ["c1"] = null, ["c2"] = "c1", ["c3"] = "c2" }, parents);
            var status = File.ReadAllText(statusPath);
            Assert.Contains("\"redefined\":[\"c1\",\"c2\",\"c3\"]", status);
            Assert.Contains("\"dropped\":[\"stale\"]", status);
            // The test driver has no QEMU to ask: every bitmap is reported missing, none is assumed present.
            Assert.Contains("c3:vda:c3", status);
            Assert.Contains("redefined 3 of 3 checkpoint(s); missing bitmaps", host.Log);
        }
        finally
        {
            DeleteAll(domain);
        }
    }

    private static void DeleteAll(LibvirtDomain domain)
    {
        foreach (var c in domain.ListAllCheckpoints(LibvirtCheckpointListFlags.Topological).Reverse())
        {
            using (c)
                c.Delete(LibvirtCheckpointDeleteFlags.MetadataOnly);
        }
    }
}
