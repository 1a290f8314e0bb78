using BFMig.Daemon.Guests;
using BFMig.Hooks;

namespace BFMig.Daemon.Tests;

/// <summary>
/// One table for the split-brain rule, run against both places that apply it: the daemon's
/// <see cref="SplitBrainGuard"/> and the hook's local path (bfmigd not answering), each with its
/// own storage (memory, marker files) and the same location record on disk.
/// </summary>
public sealed class SplitBrainRuleTests : IDisposable
{
    private const string Uuid = "0b5d1c4e-1111-2222-3333-444455556666";
    private const string Xml = $"<domain type='qemu'><name>g1</name><uuid>{Uuid}</uuid><devices/></domain>";
    private readonly DirectoryInfo _dir = Directory.CreateTempSubdirectory("bfmig-rule-");
    private readonly Clock _clock = new();

    public void Dispose() => _dir.Delete(recursive: true);

    public enum Side
    {
        Daemon,
        Hook,
    }

    /// <summary>
    /// Record: none, here, away, departing (here, leaving for hostB), arriving (away at hostB, coming back),
    /// damaged (location.json is not JSON), badpending (a pending trip of a kind this version does not know).
    /// Steps: hook calls ("migrate" = migrate begin, "release" = release end, "wait" = 3 minutes pass);
    /// the expectation is for the last step.
    /// </summary>
    public static TheoryData<Side, string, string, bool> Table()
    {
        var rows = new (string Record, string Steps, bool Allowed)[]
        {
            ("none", "prepare", true),
            ("none", "start", true),
            ("here", "prepare", true),
            ("away", "prepare", false),
            ("away", "start", false),
            ("departing", "prepare", false),
            ("departing", "start", false),
            ("arriving", "prepare", false),
            ("away", "release", true),
            ("away", "migrate prepare", true),
            ("away", "migrate prepare start", true),
            ("away", "migrate prepare prepare", false),
            ("away", "migrate wait prepare", false),
            ("away", "migrate started prepare", false),
            ("away", "migrate release prepare", false),
            ("away", "migrate prepare started start", false),
            ("arriving", "migrate prepare start", true),
            // An unusable record is BFMig's own failure: stock behaviour, with a warning (asserted below).
            ("damaged", "prepare", true),
            ("damaged", "start", true),
            ("damaged", "release", true),
            ("damaged", "migrate prepare start", true),
            ("badpending", "prepare", true),
        };
        var data = new TheoryData<Side, string, string, bool>();
        foreach (var side in Enum.GetValues<Side>())
        {
            foreach (var (record, steps, allowed) in rows)
                data.Add(side, record, steps, allowed);
        }
        return data;
    }

    [Theory]
    [MemberData(nameof(Table))]
    public void One_rule_whether_or_not_the_daemon_answers(Side side, string record, string steps, bool allowed)
    {
        var state = Path.Combine(_dir.FullName, "state");
        var store = new GuestStateStore(state);
        var now = _clock.GetUtcNow();
        LocationRecord? location = record switch
        {
            "here" => new LocationRecord(GuestPlace.Here, "hostB", now.AddHours(-1)),
            "away" => new LocationRecord(GuestPlace.Away, "hostB", now.AddHours(-1)),
            "departing" => new LocationRecord(GuestPlace.Here, "", now.AddHours(-1), PendingTrip.Departing, "hostB"),
            "arriving" => new LocationRecord(GuestPlace.Away, "hostB", now.AddHours(-1), PendingTrip.Arriving, "hostB"),
            _ => null,
        };
        if (location is not null)
            store.WriteLocation(Guid.Parse(Uuid), location);
        var locationFile = DefaultPaths.LocationFile(state, Guid.Parse(Uuid));
        if (record is "damaged" or "badpending")
        {
            Directory.CreateDirectory(Path.GetDirectoryName(locationFile)!);
            File.WriteAllText(locationFile, record == "damaged"
                ? "{\"location\": \"aw"
                : "{\"location\": \"here\", \"peer\": \"\", \"pending\": \"leaving\", \"pendingPeer\": \"hostB\"}");
        }

        var guard = new SplitBrainGuard(store, _clock);
        var daemonWarnings = new List<string>();
        guard.UnusableRecord += daemonWarnings.Add;
        var settings = new HookSettings(state, Path.Combine(_dir.FullName, "run"), $"unix:path={Path.Combine(_dir.FullName, "no-bus")}",
            TimeSpan.FromSeconds(2), _clock);
        (bool Allowed, string Message) last = (true, "");
        foreach (var step in steps.Split(' '))
        {
            if (step == "wait")
            {
                _clock.Advance(TimeSpan.FromMinutes(3));
                continue;
            }
            var (op, sub) = step switch
            {
                "release" => ("release", "end"),
                _ => (step, "begin"),
            };
            last = side == Side.Daemon ? AskDaemon(guard, op, sub) : AskHook(settings, op, sub);
        }
        Assert.True(allowed == last.Allowed, $"{side}: {record} / {steps}: expected {(allowed ? "allowed" : "refused")}, got {last}");
        if (!allowed)
        {
            Assert.Contains("hostB", last.Message);
            Assert.Contains("bfmig forget g1", last.Message);
        }
        if (record is "damaged" or "badpending" && steps.Split(' ')[^1] is "prepare" or "start")
        {
            // Allowed, but never silently: the file and the way out are named.
            var warning = side == Side.Daemon ? string.Join('\n', daemonWarnings) : last.Message;
            Assert.Contains(locationFile, warning);
            Assert.Contains("not applying the split-brain guard", warning);
            Assert.Contains("bfmig forget g1", warning);
        }
    }

    private static (bool, string) AskDaemon(SplitBrainGuard guard, string op, string sub)
    {
        var decision = guard.Decide("g1", op, sub, Xml);
        return (decision.Allow, decision.Message);
    }

    private static (bool, string) AskHook(HookSettings settings, string op, string sub)
    {
        var stderr = new StringWriter();
        var code = Hook.Run(["g1", op, sub, "-"], new StringReader(Xml), new StringWriter(), stderr, settings);
        return (code == 0, stderr.ToString());
    }

    private sealed class Clock : TimeProvider
    {
        private DateTimeOffset _now = DateTimeOffset.UtcNow;

        public override DateTimeOffset GetUtcNow() => _now;

        public void Advance(TimeSpan by) => _now += by;
    }
}
