using BFMig.Hooks;
using BFMig.Native.Tests.DBus;
using BFMig.Tests.Shared;
using Tmds.DBus.Protocol;

namespace BFMig.Native.Tests.Hooks;

/// <summary>The hook's logic in-process, against a real private dbus-daemon playing bfmigd (or nothing at all).</summary>
public sealed class HookTests : IClassFixture<PrivateBusFixture>, IDisposable
{
    private const string Uuid = "0b5d1c4e-1111-2222-3333-444455556666";
    private const string Xml = $"<domain type='qemu'><name>g1</name><uuid>{Uuid}</uuid><devices/></domain>";
    private readonly PrivateBusFixture _bus;
    private readonly DirectoryInfo _dir;

    public HookTests(PrivateBusFixture bus)
    {
        _bus = bus;
        _dir = Directory.CreateTempSubdirectory("bfmig-hook-");
    }

    private HookSettings Settings(string? busAddress, TimeSpan? timeout = null) => new(
        Path.Combine(_dir.FullName, "state"), Path.Combine(_dir.FullName, "run"),
        busAddress ?? $"unix:path={Path.Combine(_dir.FullName, "no-bus")}", timeout ?? TimeSpan.FromSeconds(5));

    private static (int Code, string Stdout, string Stderr) Run(HookSettings settings, params string[] args)
    {
        var stdout = new StringWriter();
        var stderr = new StringWriter();
        int code = Hook.Run(args, new StringReader(Xml), stdout, stderr, settings);
        return (code, stdout.ToString(), stderr.ToString());
    }

    /// <summary>Writes mem/state.json the way the transfer store does (camelCase StoreState).</summary>
    private void RecordLocation(string content)
    {
        string dir = Path.Combine(_dir.FullName, "state", Uuid, "mem");
        Directory.CreateDirectory(dir);
        File.WriteAllText(Path.Combine(dir, "state.json"), content);
    }

    private static string State(string location, string peer = "hostB") =>
        $$"""{ "generation": 3, "digest": "ab", "seed": 1, "peer": "{{peer}}", "location": "{{location}}", "since": "2026-11-23T12:00:00+00:00", "snapshotComplete": true }""";

    [Fact]
    public async Task A_bus_that_accepts_but_never_answers_costs_libvirt_at_most_the_deadline_and_the_local_guard_still_refuses()
    {
        // The socket accepts (the kernel completes the connection) and then says nothing: not even the SASL handshake.
        string path = Path.Combine(_dir.FullName, "silent-bus");
        using var silent = new System.Net.Sockets.Socket(System.Net.Sockets.AddressFamily.Unix, System.Net.Sockets.SocketType.Stream, System.Net.Sockets.ProtocolType.Unspecified);
        silent.Bind(new System.Net.Sockets.UnixDomainSocketEndPoint(path));
        silent.Listen(8);
        var held = new List<System.Net.Sockets.Socket>();
        _ = Task.Run(async () =>
        {
            while (true)
                held.Add(await silent.AcceptAsync());
        });
        RecordLocation(State("away"));
        var settings = Settings($"unix:path={path}", TimeSpan.FromSeconds(1));
        var clock = System.Diagnostics.Stopwatch.StartNew();
        var (code, _, stderr) = await Task.Run(() => Run(settings, "g1", "prepare", "begin", "-")).WaitAsync(TimeSpan.FromSeconds(15));
        clock.Stop();
        Assert.True(clock.Elapsed < TimeSpan.FromSeconds(3), $"the hook took {clock.Elapsed.TotalSeconds:F1} s with a 1 s deadline");
        Assert.Equal(1, code);
        Assert.Contains("hostB", stderr);
    }

    [Fact]
    public void Without_a_daemon_migrate_echoes_the_xml_and_other_ops_pass()
    {
        var settings = Settings(null);
        Assert.Equal((0, Xml, ""), Run(settings, "g1", "migrate", "begin", "-"));
        Assert.Equal((0, "", ""), Run(settings, "g1", "started", "begin", "-"));
        Assert.Equal((0, "", ""), Run(settings, "g1", "prepare", "begin", "-"));
    }

    [Fact]
    public void Without_a_daemon_a_guest_recorded_away_is_not_started()
    {
        var settings = Settings(null);
        RecordLocation(State("away"));
        var (code, stdout, stderr) = Run(settings, "g1", "prepare", "begin", "-");
        Assert.Equal(1, code);
        Assert.Equal("", stdout);
        Assert.Contains("runs on hostB since 2026-11-23 12:00:00Z", stderr);
        Assert.Contains("bfmig forget g1", stderr);

        // Other ops are not blocked (stopping a guest must always work).
        Assert.Equal(0, Run(settings, "g1", "release", "end", "-").Code);

        RecordLocation(State("here"));
        Assert.Equal(0, Run(settings, "g1", "prepare", "begin", "-").Code);
    }

    [Fact]
    public void Without_a_daemon_the_return_trip_is_let_in_once()
    {
        var settings = Settings(null);
        RecordLocation(State("away"));
        Assert.Equal(0, Run(settings, "g1", "migrate", "begin", "-").Code);
        Assert.True(File.Exists(Path.Combine(settings.RunDirectory, "incoming", Uuid)));
        Assert.Equal(0, Run(settings, "g1", "prepare", "begin", "-").Code);
        Assert.False(File.Exists(Path.Combine(settings.RunDirectory, "incoming", Uuid)));
        // The marker is used up: a later plain start is refused again.
        Assert.Equal(1, Run(settings, "g1", "prepare", "begin", "-").Code);
    }

    [Fact]
    public void A_marker_in_a_directory_others_can_write_does_not_count()
    {
        var settings = Settings(null);
        RecordLocation(State("away"));
        Assert.Equal(0, Run(settings, "g1", "migrate", "begin", "-").Code);
        string incoming = Path.Combine(settings.RunDirectory, "incoming");
        Assert.Equal(UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.UserExecute, File.GetUnixFileMode(incoming));
        // Had anyone but root been able to write there, they could have planted the marker.
        File.SetUnixFileMode(incoming, File.GetUnixFileMode(incoming) | UnixFileMode.GroupWrite | UnixFileMode.GroupExecute);
        var (code, _, stderr) = Run(settings, "g1", "prepare", "begin", "-");
        Assert.Equal(1, code);
        Assert.Contains("hostB", stderr);
    }

    [Fact]
    public void A_damaged_location_record_warns_but_does_not_block()
    {
        RecordLocation("{ \"location\": \"away\", truncated");
        var (code, _, stderr) = Run(Settings(null), "g1", "prepare", "begin", "-");
        Assert.Equal(0, code);
        Assert.Contains("is not valid JSON", stderr);
        Assert.Contains(Path.Combine(_dir.FullName, "state", Uuid, "mem", "state.json"), stderr);
        Assert.Contains("bfmig forget g1", stderr);

        RecordLocation(State("elsewhere"));
        (code, _, stderr) = Run(Settings(null), "g1", "prepare", "begin", "-");
        Assert.Equal(0, code);
        Assert.Contains("expected 'here' or 'away'", stderr);
    }

    [Fact]
    public void With_a_daemon_its_answer_decides()
    {
        var calls = new List<string>();
        var pending = new List<MethodContext>();
        using var daemon = TestBus.Open(_bus.Address);
        daemon.Connection.AddMethodHandler(new TestObject(Hook.ObjectPath, call =>
        {
            if (call.Request.MemberAsString != "HookEvent" || call.Request.SignatureAsString != "sssss")
                return false;
            var r = call.Request.GetBodyReader();
            string guest = r.ReadString(), op = r.ReadString(), subop = r.ReadString(), extra = r.ReadString(), xml = r.ReadString();
            lock (calls)
            {
                calls.Add($"{guest} {op} {subop} {extra} {xml.Length}");
            }
            switch (op)
            {
                case "prepare":
                    call.Reply("bss", (ref MessageWriter w) =>
                    {
                        w.WriteBool(false);
                        w.WriteString("guest g1 runs on hostB (daemon says)");
                        w.WriteString("");
                    });
                    return true;
                case "stopped":
                    call.DisposesAsynchronously = true; // never answers: the hook must give up and fail open
                    pending.Add(call);
                    return true;
                case "release":
                    call.ReplyError("org.freedesktop.DBus.Error.Failed", "daemon bug"); // fail open as well
                    return true;
                default:
                    call.Reply("bss", (ref MessageWriter w) =>
                    {
                        w.WriteBool(true);
                        w.WriteString("");
                        w.WriteString(op == "migrate" ? xml.Replace("<devices/>", "<devices><!--bfmig--></devices>") : "");
                    });
                    return true;
            }
        }));
        daemon.RequestName(Hook.BusName);
        // In this test process the first call also JIT-compiles the bus client (the installed hook is
        // native AOT): the answered calls get room for that; the unanswered one has the short deadline.
        var settings = Settings(_bus.Address, TimeSpan.FromSeconds(5));
        // Long enough for the hook to connect and send on a loaded machine, short against libvirt's patience.
        var impatient = Settings(_bus.Address, TimeSpan.FromSeconds(2));

        var (code, stdout, _) = Run(settings, "g1", "migrate", "begin", "-");
        Assert.Equal(0, code);
        Assert.Contains("<devices><!--bfmig--></devices>", stdout);

        var refused = Run(settings, "g1", "prepare", "begin", "-");
        Assert.Equal(1, refused.Code);
        Assert.Contains("guest g1 runs on hostB (daemon says)", refused.Stderr);

        // A daemon error is not a refusal: fail open.
        Assert.Equal(0, Run(settings, "g1", "release", "end", "-").Code);

        var started = DateTime.UtcNow;
        Assert.Equal(0, Run(impatient, "g1", "stopped", "end", "-").Code);
        Assert.InRange(DateTime.UtcNow - started, TimeSpan.FromMilliseconds(1900), TimeSpan.FromSeconds(10));

        // The test daemon's receive loop may record the unanswered call after the hook has given up.
        var deadline = DateTime.UtcNow.AddSeconds(10);
        while (DateTime.UtcNow < deadline)
        {
            lock (calls)
            {
                if (calls.Count >= 4)
                    break;
            }
            Thread.Sleep(20);
        }
        lock (calls)
        {
            Assert.Equal([$"g1 migrate begin - {Xml.Length}", $"g1 prepare begin - {Xml.Length}", $"g1 release end - {Xml.Length}",
                $"g1 stopped end - {Xml.Length}"], calls);
        }
    }

    [Fact]
    public void A_reply_of_the_wrong_shape_fails_open_like_no_daemon()
    {
        using var daemon = TestBus.Open(_bus.Address);
        // A daemon of another version, or anything else that took the name: "s" instead of "bss".
        daemon.Connection.AddMethodHandler(new TestObject(Hook.ObjectPath, call =>
        {
            call.Reply("s", (ref MessageWriter w) => w.WriteString("not what the hook expects"));
            return true;
        }));
        daemon.RequestName(Hook.BusName);
        var settings = Settings(_bus.Address, TimeSpan.FromSeconds(5));

        var (code, stdout, stderr) = Run(settings, "g1", "migrate", "begin", "-");
        Assert.True(code == 0, stderr);
        Assert.Equal(Xml, stdout.TrimEnd());
        Assert.Equal(0, Run(settings, "g1", "prepare", "begin", "-").Code);
    }

    [Theory]
    [InlineData("<domain><name>x</name><uuid>0B5D1C4E-1111-2222-3333-444455556666</uuid></domain>", Uuid)]
    [InlineData("<domain><name>x</name><uuid> not-a-uuid </uuid></domain>", null)]
    [InlineData("<domain><name>x</name></domain>", null)]
    public void Domain_uuid_is_taken_from_the_xml(string xml, string? expected) => Assert.Equal(expected, Hook.DomainUuid(xml));

    public void Dispose() => _dir.Delete(recursive: true);
}
