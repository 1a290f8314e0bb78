using System.Xml.Linq;
using BFMig.Daemon.Tests.Infrastructure;
using BFMig.Bus;
using BFMig.Tests.Shared;
using Tmds.DBus.Protocol;
using BFMig.Native.Libvirt;

namespace BFMig.Daemon.Tests;

/// <summary>
/// The daemon's D-Bus API on a private dbus-daemon, called through the Tmds.DBus.Protocol client and
/// through busctl/dbus-send as independent clients (and as uid 65534 through setpriv).
/// </summary>
public sealed class DaemonBusTests : IAsyncLifetime
{
    private const string Manager = "org.bfmig.BFMig1.Manager";
    private const string TestGuestUuid = "6695eb01-f6a4-8304-79aa-97f2502e193f";
    private static readonly TimeSpan Timeout = TimeSpan.FromSeconds(20);
    private readonly PrivateBus _bus = new();
    private DaemonHost _host = null!;
    private BusClient _client = null!;

    public Task InitializeAsync()
    {
        _host = DaemonHost.Start(_bus, DaemonHost.Ini("hosta", "hostb", 9));
        _client = TestBus.Open(_bus.Address);
        return Task.CompletedTask;
    }

    public async Task DisposeAsync()
    {
        try
        {
            _client?.Dispose();
            if (_host is not null)
                await _host.DisposeAsync();
        }
        finally
        {
            _bus.Dispose();
        }
    }

    private T Call<T>(string method, BodyWriter? write, BodyReader<T> read) => _client.CallManager(method, write, read);

    private (bool Allow, string Message, string XmlOut) Hook(string guest, string op, string subop, string xml) =>
        Call("HookEvent", (ref MessageWriter w) =>
        {
            w.WriteString(guest);
            w.WriteString(op);
            w.WriteString(subop);
            w.WriteString("-");
            w.WriteString(xml);
        }, (ref Reader r) => (r.ReadBool(), r.ReadString(), r.ReadString()));

    private static string DomainXml(string name, string uuid) => $"<domain type='qemu'><name>{name}</name><uuid>{uuid}</uuid><devices><disk><uuid>00000000-0000-0000-0000-000000000001</uuid></disk></devices></domain>";

    [Fact]
    public void The_exported_interface_matches_the_checked_in_xml()
    {
        var contract = Describe(XDocument.Load(Path.Combine(Tools.RepositoryRoot(), "src", "Daemon", "org.bfmig.BFMig1.xml")));
        Assert.Contains(contract, l => l.StartsWith("method HookEvent(", StringComparison.Ordinal));

        var native = _client.Call("org.bfmig.BFMig1", "/org/bfmig/BFMig1", "org.freedesktop.DBus.Introspectable", "Introspect", "", null, (m, _) => m.GetBodyReader().ReadString(), Timeout);
        Assert.Equal(contract, Describe(XDocument.Parse(native)));

        var (code, busctl, err) = Tools.Run("busctl", "--address=" + _bus.Address, "introspect", "--xml-interface", "org.bfmig.BFMig1", "/org/bfmig/BFMig1");
        Assert.True(code == 0, err);
        Assert.Equal(contract, Describe(XDocument.Parse(busctl)));
    }

    /// <summary>One line per method and signal of the Manager interface: names, arg names, types and directions.</summary>
    private static List<string> Describe(XDocument document)
    {
        var iface = document.Descendants("interface").Single(i => (string?)i.Attribute("name") == Manager);
        var lines = new List<string>();
        foreach (var member in iface.Elements().Where(e => e.Name == "method" || e.Name == "signal"))
        {
            var args = member.Elements("arg").Select(a =>
                $"{(member.Name == "method" ? ((string?)a.Attribute("direction") ?? "in") + " " : "")}{(string?)a.Attribute("name")} {(string?)a.Attribute("type")}");
            lines.Add($"{member.Name} {(string?)member.Attribute("name")}({string.Join(", ", args)})");
        }
        lines.Sort(StringComparer.Ordinal);
        return lines;
    }

    [Fact]
    public void GetStatus_answers_the_native_client_and_dbus_send()
    {
        var status = Call("GetStatus", null, (ref Reader r) => Variants.ReadDictionary(ref r));
        Assert.Equal("hosta", status["host_name"]);
        Assert.Equal(new[] { "hostb" }, (string[])status["peers"]);
        Assert.Equal(0u, status["active_transfers"]);
        Assert.Equal(_host.Daemon.PeerPort, (int)(uint)status["data_port"]);

        var (code, output, err) = Tools.Run("dbus-send", "--bus=" + _bus.Address, "--print-reply", "--dest=org.bfmig.BFMig1",
            "/org/bfmig/BFMig1", Manager + ".GetStatus");
        Assert.True(code == 0, err);
        Assert.Contains("\"host_name\"", output);
        Assert.Contains("\"hosta\"", output);

        // Reading status is open to everyone.
        var (nobodyCode, nobodyOut, nobodyErr) = Tools.RunAsNobody("busctl", "--address=" + _bus.Address, "call", "org.bfmig.BFMig1",
            "/org/bfmig/BFMig1", Manager, "GetStatus");
        Assert.True(nobodyCode == 0, nobodyErr);
        Assert.Contains("\"hosta\"", nobodyOut);
    }

    [Fact]
    public void State_changing_methods_are_refused_to_non_root_callers_with_a_clear_error()
    {
        Directory.CreateDirectory(Path.Combine(_host.Options.StateDirectory, TestGuestUuid, "mem"));
        foreach (var (method, args) in new[] { ("Forget", new[] { "s", "test" }), ("PrepareMigration", new[] { "ss", "test", "hostb" }),
                     ("HookEvent", new[] { "sssss", "test", "prepare", "begin", "-", "" }) })
        {
            var (code, _, err) = Tools.RunAsNobody("dbus-send", ["--bus=" + _bus.Address, "--print-reply", "--dest=org.bfmig.BFMig1",
                "/org/bfmig/BFMig1", $"{Manager}.{method}", .. args.Skip(1).Select(a => "string:" + a)]);
            Assert.NotEqual(0, code);
            Assert.Contains("org.bfmig.BFMig1.Error.AccessDenied", err);
            Assert.Contains($"{method} changes BFMig state and is allowed to root only (caller uid 65534)", err);
        }
        Assert.True(Directory.Exists(Path.Combine(_host.Options.StateDirectory, TestGuestUuid)), "a refused Forget must not delete anything");
        Assert.Contains("refused Forget to uid 65534", _host.Log);
    }

    [Fact]
    public void Methods_that_reveal_guests_or_make_the_host_work_are_root_only_without_an_admin_group()
    {
        _host.Daemon.Store.SaveName(Guid.Parse(TestGuestUuid), "test");
        foreach (var (method, args) in new[] { ("ListGuests", Array.Empty<string>()), ("ListTrips", []), ("Doctor", []), ("Estimate", ["test", "hostb"]) })
        {
            // A supplementary group changes nothing while daemon:admin_group is not set.
            foreach (var groups in new[] { "--clear-groups", "--groups=50" })
            {
                var (code, output, err) = Tools.Run("setpriv", ["--reuid=65534", "--regid=65534", groups, "dbus-send", "--bus=" + _bus.Address,
                    "--print-reply", "--dest=org.bfmig.BFMig1", "/org/bfmig/BFMig1", $"{Manager}.{method}", .. args.Select(a => "string:" + a)]);
                Assert.True(code != 0, $"{method} answered uid 65534 ({groups}): {output}");
                Assert.Contains("org.bfmig.BFMig1.Error.AccessDenied", err);
                Assert.Contains($"{method} shows this host's guests or makes it work and is allowed to root only (caller uid 65534; daemon:admin_group is not set", err);
                Assert.DoesNotContain(TestGuestUuid, output + err);
            }
        }
        Assert.Contains("refused ListGuests to uid 65534: root only (daemon:admin_group not set)", _host.Log);
        // Root still gets all three.
        Assert.Contains(Call("ListGuests", null, ReadGuests), g => g.Uuid == TestGuestUuid);
        Assert.Equal(0, Tools.Busctl(_bus, "Doctor").ExitCode);
        Assert.Equal(0, Tools.Busctl(_bus, "Estimate", "ss", "test", "hostb").ExitCode);
    }

    [Fact]
    public void The_split_brain_guard_refuses_a_guest_that_runs_on_a_peer_unless_it_is_migrating_in()
    {
        var uuid = Guid.Parse("11111111-2222-3333-4444-555555555555");
        var xml = DomainXml("web1", uuid.ToString());
        Assert.True(Hook("web1", "prepare", "begin", xml).Allow, "a guest BFMig knows nothing about starts as usual");

        _host.Daemon.Store.SaveName(uuid, "web1");
        _host.Daemon.Store.WriteLocation(uuid, new LocationRecord(GuestPlace.Away, "hostb", DateTimeOffset.UtcNow));
        foreach (var op in new[] { "prepare", "start" })
        {
            var refused = Hook("web1", op, "begin", xml);
            Assert.False(refused.Allow);
            Assert.Contains("host hostb", refused.Message);
            Assert.Contains("bfmig forget web1", refused.Message);
            Assert.Contains($"refusing to {op} guest web1", refused.Message);
        }
        Assert.Contains("split-brain guard refused prepare of guest web1", _host.Log);

        // Other operations pass, and migrate leaves the XML unchanged.
        Assert.Equal((true, "", ""), Hook("web1", "migrate", "begin", xml));
        // That migrate begin announced an incoming migration: prepare and start now pass.
        Assert.True(Hook("web1", "prepare", "begin", xml).Allow);
        Assert.True(Hook("web1", "start", "begin", xml).Allow);
        // Once it has started here (libvirt's "started"), the announcement is used up.
        Assert.True(Hook("web1", "started", "begin", xml).Allow);
        Assert.False(Hook("web1", "prepare", "begin", xml).Allow);

        // Back here: starting is fine again.
        _host.Daemon.Store.WriteLocation(uuid, new LocationRecord(GuestPlace.Here, "", DateTimeOffset.UtcNow));
        Assert.True(Hook("web1", "prepare", "begin", xml).Allow);
    }

    [Fact]
    public void Forget_deletes_a_retained_guest_by_name_refuses_while_its_store_is_in_use_and_names_unknown_guests()
    {
        var uuid = Guid.Parse("aaaaaaaa-2222-3333-4444-555555555555");
        _host.Daemon.Store.SaveName(uuid, "db1");
        _host.Daemon.Store.WriteLocation(uuid, new LocationRecord(GuestPlace.Away, "hostb", DateTimeOffset.UtcNow));
        var dir = _host.Daemon.Store.GuestDirectory(uuid);
        Directory.CreateDirectory(Path.Combine(dir, "mem"));

        var listed = Call("ListGuests", null, ReadGuests);
        Assert.Contains(listed, g => g.Uuid == uuid.ToString() && g.Name == "db1" && g.Location == "away" && g.Peer == "hostb");

        // A helper holds the store (as during a trip): refused, nothing deleted.
        using (new FileStream(Path.Combine(dir, "mem", "lock"), FileMode.OpenOrCreate, FileAccess.ReadWrite, FileShare.None))
        {
            var busy = Assert.Throws<DBusErrorReplyException>(() => Call("Forget", (ref MessageWriter w) => w.WriteString("db1"), (ref Reader _) => 0));
            Assert.Equal("org.bfmig.BFMig1.Error.Busy", busy.ErrorName);
            Assert.True(Directory.Exists(dir));
        }

        var (code, _, err) = Tools.Busctl(_bus, "Forget", "s", "db1");
        Assert.True(code == 0, err);
        Assert.False(Directory.Exists(dir));
        Assert.DoesNotContain(Call("ListGuests", null, ReadGuests), g => g.Uuid == uuid.ToString());

        var unknown = Assert.Throws<DBusErrorReplyException>(() => Call("Forget", (ref MessageWriter w) => w.WriteString("db1"), (ref Reader _) => 0));
        Assert.Equal("org.bfmig.BFMig1.Error.UnknownGuest", unknown.ErrorName);
        Assert.Contains("nothing is retained for guest 'db1'", unknown.ErrorMessage);
    }

    [Fact]
    public void Forget_refuses_a_guest_whose_trip_is_pending_and_naming_it()
    {
        var uuid = Guid.Parse("aaaaaaaa-2222-3333-4444-666666666666");
        _host.Daemon.Store.SaveName(uuid, "db2");
        _host.Daemon.Store.WriteLocation(uuid, new LocationRecord(GuestPlace.Here, "", DateTimeOffset.UtcNow, PendingTrip.Departing, "hostb"));
        var dir = _host.Daemon.Store.GuestDirectory(uuid);

        var pending = Assert.Throws<DBusErrorReplyException>(() => Call("Forget", (ref MessageWriter w) => w.WriteString("db2"), (ref Reader _) => 0));
        Assert.Equal("org.bfmig.BFMig1.Error.Busy", pending.ErrorName);
        Assert.Contains("pending departure to hostb", pending.ErrorMessage);
        Assert.True(Directory.Exists(dir));

        _host.Daemon.Store.WriteLocation(uuid, new LocationRecord(GuestPlace.Away, "hostb", DateTimeOffset.UtcNow));
        var (code, _, err) = Tools.Busctl(_bus, "Forget", "s", "db2");
        Assert.True(code == 0, err);
        Assert.False(Directory.Exists(dir));
    }

    [Fact]
    public void PrepareMigration_returns_the_peer_uri_and_the_sockets_of_a_running_guest()
    {
        var (destination, mig, nbd) = Call("PrepareMigration", (ref MessageWriter w) =>
        {
            w.WriteString("test");
            w.WriteString("hostb");
        }, (ref Reader r) => (r.ReadString(), r.ReadString(), r.ReadString()));
        Assert.Equal("qemu+tcp://hostb/system", destination);
        var run = _host.Options.RuntimeDirectory;
        Assert.Equal($"unix://{run}/hostb/test.mig", mig);
        Assert.Equal($"unix://{run}/hostb/test.nbd", nbd);
        Assert.StartsWith("socket", Tools.Stat(mig["unix://".Length..]).Split(' ')[2]);

        var unknownPeer = Assert.Throws<DBusErrorReplyException>(() => Call("PrepareMigration", (ref MessageWriter w) =>
        {
            w.WriteString("test");
            w.WriteString("hostz");
        }, (ref Reader _) => 0));
        Assert.Equal("org.bfmig.BFMig1.Error.UnknownPeer", unknownPeer.ErrorName);

        var unknownGuest = Assert.Throws<DBusErrorReplyException>(() => Call("PrepareMigration", (ref MessageWriter w) =>
        {
            w.WriteString("no-such-guest");
            w.WriteString("hostb");
        }, (ref Reader _) => 0));
        Assert.Equal("org.bfmig.BFMig1.Error.UnknownGuest", unknownGuest.ErrorName);
    }

    [Fact]
    public void Doctor_reports_each_check_with_a_reason()
    {
        var checks = Call("Doctor", null, (ref Reader r) =>
        {
            var list = new List<(string Name, bool Passed, string Detail)>();
            var end = r.ReadArrayStart(DBusType.Struct);
            while (r.HasNext(end))
            {
                r.AlignStruct();
                list.Add((r.ReadString(), r.ReadBool(), r.ReadString()));
            }
            return list;
        }).ToDictionary(c => c.Name);
        Assert.False(checks["hook"].Passed);
        Assert.Contains("missing", checks["hook"].Detail);
        Assert.True(checks["libvirt"].Passed, checks["libvirt"].Detail);
        Assert.True(checks["runtime_dir"].Passed, checks["runtime_dir"].Detail);
        Assert.True(checks["state_dir"].Passed, checks["state_dir"].Detail);
        Assert.True(checks["auth"].Passed, checks["auth"].Detail);
        // hostb is configured at 127.0.0.1:9, where nothing listens.
        Assert.False(checks["peer:hostb"].Passed);
        Assert.Contains("127.0.0.1:9", checks["peer:hostb"].Detail);

        // With the hook installed and executable, that check passes.
        File.WriteAllText(_host.Options.HookPath, "#!/bin/sh\n");
        File.SetUnixFileMode(_host.Options.HookPath, (UnixFileMode)0b111_101_101);
        var (code, output, err) = Tools.Busctl(_bus, "Doctor");
        Assert.True(code == 0, err);
        Assert.Contains("\"hook\" true", output);
    }

    [Fact]
    public void Estimate_says_what_it_rests_on()
    {
        var uuid = Guid.Parse("bbbbbbbb-2222-3333-4444-555555555555");
        _host.Daemon.Store.SaveName(uuid, "app1");
        _host.Daemon.Store.WriteLocation(uuid, new LocationRecord(GuestPlace.Here, "hostb", DateTimeOffset.UtcNow));
        var (disk, memory, stockDisk, stockMemory, basis) = Call("Estimate", (ref MessageWriter w) =>
        {
            w.WriteString("app1");
            w.WriteString("hostb");
        }, (ref Reader r) => (r.ReadUInt64(), r.ReadUInt64(), r.ReadUInt64(), r.ReadUInt64(), r.ReadString()));
        Assert.Equal((0ul, 0ul, 0ul, 0ul), (disk, memory, stockDisk, stockMemory));
        Assert.Contains("memory: nothing retained", basis);
        Assert.Contains("disk: no block map retained", basis);
    }

    private static List<(string Uuid, string Name, string Location, string Peer, ulong Generation, ulong Memory, ulong Disk, long Since)> ReadGuests(ref Reader r)
    {
        var list = new List<(string, string, string, string, ulong, ulong, ulong, long)>();
        var end = r.ReadArrayStart(DBusType.Struct);
        while (r.HasNext(end))
        {
            r.AlignStruct();
            list.Add((r.ReadString(), r.ReadString(), r.ReadString(), r.ReadString(), r.ReadUInt64(), r.ReadUInt64(), r.ReadUInt64(), r.ReadInt64()));
        }
        return list;
    }

    [Fact]
    public async Task Running_guest_sockets_follow_libvirt_start_and_stop()
    {
        var sockets = new[] { "test.mig", "test.nbd" }.Select(f => Path.Combine(_host.Options.RuntimeDirectory, "hostb", f)).ToArray();
        await Tools.UntilAsync(() => sockets.All(File.Exists), "sockets of the running test guest");
        using var libvirt = LibvirtConnection.Open("test:///default");
        using var domain = libvirt.LookupDomainByName("test");
        try
        {
            domain.Destroy();
            await Tools.UntilAsync(() => !sockets.Any(File.Exists), "sockets removed after the guest stopped");
        }
        finally
        {
            domain.Start();
        }
        await Tools.UntilAsync(() => sockets.All(File.Exists), "sockets back after the guest started");
        Assert.Contains("guest test: migration sockets removed", _host.Log);
    }
}
