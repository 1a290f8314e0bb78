using BFMig.Bus;
using BFMig.Contracts;
using Tmds.DBus.Protocol;

namespace BFMig.Hooks;

/// <summary>
/// One libvirt qemu hook invocation: <c>&lt;guest&gt; &lt;op&gt; &lt;subop&gt; &lt;extra&gt;</c>, domain XML on stdin.
/// Tells bfmigd (org.bfmig.BFMig1.Manager.HookEvent, see src/Daemon/org.bfmig.BFMig1.xml); prints the
/// XML back for <c>migrate</c>. Fail-open: if the
/// daemon is unreachable libvirt proceeds as without BFMig, except that starting a guest BFMig
/// knows to be running elsewhere is refused from local state.
/// </summary>
internal static class Hook
{
    public const string BusName = BusContract.BusName;
    public const string ObjectPath = BusContract.ObjectPath;
    public const string Interface = BusContract.Interface;

    public static int Run(string[] args, TextReader stdin, TextWriter stdout, TextWriter stderr, HookSettings settings)
    {
        if (args.Length < 2)
        {
            stderr.WriteLine("bfmig-hook: usage: bfmig-hook <guest> <op> <subop> <extra> < domain.xml");
            // Unknown invocation: do not block libvirt.
            return 0;
        }
        string guest = args[0];
        string op = args[1];
        string subop = args.Length > 2 ? args[2] : "-";
        string extra = args.Length > 3 ? args[3] : "-";
        string xml = stdin.ReadToEnd();
        string? uuid = DomainUuid(xml);

        (DaemonAnswer answer, string? xmlOut, string? message) = AskDaemonWithin(settings, guest, op, subop, extra, xml);
        if (answer == DaemonAnswer.Refused)
        {
            stderr.WriteLine($"bfmig: {message}");
            return 1;
        }
        // The hook keeps its own note of an incoming migration whether or not the daemon answered,
        // so that a daemon that stops answering mid-migration does not turn the return trip away.
        if (LocalGuard(settings, guest, op, subop, uuid, decide: answer == DaemonAnswer.Unreachable, stderr) != 0)
        {
            return 1;
        }
        if (op == "migrate")
        {
            stdout.Write(string.IsNullOrEmpty(xmlOut) ? xml : xmlOut);
        }
        return 0;
    }

    private enum DaemonAnswer
    {
        Accepted,
        Refused,
        Unreachable,
    }

    /// <summary>
    /// Asks the daemon with a hard wall-clock deadline (<see cref="HookSettings.DaemonTimeout"/>)
    /// over the whole call: connecting and authenticating to the bus have no timeout of their own,
    /// and a bus that accepts but never answers would hold libvirt (which waits for this hook).
    /// Past the deadline the answer is "unreachable" and the local guard decides; the stuck call
    /// is left on a background thread that ends with this short-lived process.
    /// </summary>
    private static (DaemonAnswer Answer, string? XmlOut, string? Message) AskDaemonWithin(HookSettings settings, string guest, string op, string subop,
        string extra, string xml)
    {
        var ask = Task.Run(() => (AskDaemon(settings, guest, op, subop, extra, xml, out string? xmlOut, out string? message), xmlOut, message));
        return ask.Wait(settings.DaemonTimeout) ? ask.Result : (DaemonAnswer.Unreachable, null, null);
    }

    private static DaemonAnswer AskDaemon(HookSettings settings, string guest, string op, string subop, string extra, string xml,
        out string? xmlOut, out string? message)
    {
        xmlOut = null;
        message = null;
        try
        {
            using BusClient bus = BusClient.Connect(settings.BusAddress, settings.DaemonTimeout);
            (bool allow, string text, string output) = bus.Call(BusName, ObjectPath, Interface, "HookEvent", "sssss", (ref MessageWriter w) =>
            {
                w.WriteString(guest);
                w.WriteString(op);
                w.WriteString(subop);
                w.WriteString(extra);
                w.WriteString(xml);
            }, static (m, _) =>
            {
                Reader r = m.GetBodyReader();
                return (r.ReadBool(), r.ReadString(), r.ReadString());
            }, settings.DaemonTimeout);
            xmlOut = output;
            message = text;
            return allow ? DaemonAnswer.Accepted : DaemonAnswer.Refused;
        }
        catch (Exception)
        {
            // No bus, no daemon, a timeout, a reply of the wrong shape or a bug on either side:
            // the local rule decides. An exception escaping here would make the hook exit non-zero,
            // and libvirt would then refuse prepare, start and migrate of every guest.
            return DaemonAnswer.Unreachable;
        }
    }

    /// <summary>
    /// The split-brain rule (<see cref="SplitBrainRule"/>, the same the daemon applies) from local
    /// state: the guest's location record and this hook's incoming-migration markers in
    /// <c>RUN/incoming/</c>. Keeps the markers up to date on every call; refuses only when
    /// <paramref name="decide"/> (the daemon did not answer).
    /// </summary>
    private static int LocalGuard(HookSettings settings, string guest, string op, string subop, string? uuid, bool decide, TextWriter stderr)
    {
        SplitBrainRule.Step step = SplitBrainRule.Classify(op, subop);
        if (uuid is null || step == SplitBrainRule.Step.Other)
        {
            return 0;
        }
        var markers = new IncomingMarkers(settings.RunDirectory, Guid.Parse(uuid));
        IncomingAnnouncement? before = markers.Read();
        IncomingAnnouncement? announcement = before;
        LocationRecord? record = null;
        string? problem = null;
        if (decide && step is SplitBrainRule.Step.Prepare or SplitBrainRule.Step.Start)
        {
            record = LocationRecord.Read(settings.StateDirectory, Guid.Parse(uuid), out problem);
            if (problem is not null)
            {
                stderr.WriteLine($"bfmig: {SplitBrainRule.UnusableRecordWarning(guest, op, problem)}");
            }
        }
        string? refusal = SplitBrainRule.Apply(guest, op, subop, record, problem, ref announcement, settings.Now);
        if (announcement != before)
        {
            markers.Write(announcement, stderr);
        }
        if (refusal is null)
        {
            return 0;
        }
        stderr.WriteLine($"bfmig: {refusal} (bfmigd is not answering, so this comes from local state; the record is "
            + $"{DefaultPaths.LocationFile(settings.StateDirectory, Guid.Parse(uuid))}.)");
        return 1;
    }

    /// <summary>The domain's top-level &lt;uuid&gt; (libvirt writes it before any nested element), or null.</summary>
    internal static string? DomainUuid(string xml)
    {
        int start = xml.IndexOf("<uuid>", StringComparison.Ordinal);
        if (start < 0)
        {
            return null;
        }
        start += "<uuid>".Length;
        int end = xml.IndexOf("</uuid>", start, StringComparison.Ordinal);
        return end > start && Guid.TryParse(xml.AsSpan(start, end - start).Trim(), out Guid uuid) ? uuid.ToString("D") : null;
    }
}
