using System.ComponentModel;
using System.Diagnostics;
using Tmds.DBus.Protocol;

namespace BFMig.Cli;

/// <summary>
/// bfmig migrate: asks bfmigd for the explicit-mode URIs, runs the ordinary virsh call with
/// them and shows what the daemon reports about the streams while virsh runs. virsh decides
/// success: its exit status is ours (any failure is 1).
/// </summary>
internal static class Migration
{
    /// <summary>How long to wait for TransferFinished after virsh succeeded, if it has not come yet.</summary>
    private static readonly TimeSpan FinishedGrace = TimeSpan.FromSeconds(2);

    /// <summary>The virsh argv (without "virsh") for a BFMig explicit-mode migration.</summary>
    public static string[] VirshArguments(string guest, MigrationUris uris) =>
    [
        "migrate", "--live", "--persistent", "--copy-storage-all",
        guest, uris.DestinationUri,
        "--migrateuri", uris.MigrateUri,
        "--disks-uri", uris.DisksUri,
    ];

    public static int Run(GlobalOptions options, string guest, string peer, bool dryRun)
    {
        using DaemonClient client = DaemonClient.Connect(DaemonClient.ResolveAddress(options.BusAddress));
        if (dryRun)
        {
            MigrationUris uris = client.PrepareMigration(guest, peer);
            string[] argv = ["virsh", .. VirshArguments(guest, uris)];
            if (options.Json)
            {
                JsonOutput.Write(new MigrateJson(guest, peer, uris.DestinationUri, uris.MigrateUri, uris.DisksUri, argv,
                    DryRun: true, VirshExitCode: null, Ok: true, 0, 0, [], Message: null), JsonOutput.Context.MigrateJson);
            }
            else
            {
                Console.Out.WriteLine(Format.ShellCommand(argv));
            }
            return 0;
        }

        // Listen before anything can happen, so no early progress is lost.
        string daemon = client.DaemonUniqueName();
        // --json: one line per progress signal, then the result on one line (JSON lines).
        Action<string, ulong, ulong>? jsonLine = options.Json
            ? (stream, sent, saved) => JsonOutput.Write(new ProgressJson("progress", guest, peer, stream, sent, saved), JsonOutput.LineContext.ProgressJson)
            : null;
        var progress = new TransferProgress(peer, AliasesOf(client, guest), options.Json ? null : new ProgressDisplay(Console.Out), jsonLine);
        var rule = new MatchRule { Type = MessageType.Signal, Sender = daemon, Path = DaemonClient.ObjectPath, Interface = DaemonClient.Interface };
        using IDisposable subscription = client.Connection.AddMatchAsync(rule, static (m, _) => TransferSignal.Read(m),
            n =>
            {
                if (n.HasValue && n.Value is { } signal)
                    progress.OnSignal(signal);
            }, emitOnCapturedContext: false, ObserverFlags.None, null).AsTask().GetAwaiter().GetResult();
        MigrationUris prepared = client.PrepareMigration(guest, peer);
        string[] virshArgs = VirshArguments(guest, prepared);

        int exitCode = RunVirsh(virshArgs);
        WaitForSignals(client, progress, exitCode == 0);
        progress.Display?.Finish();

        TransferProgress.Snapshot result = progress.Take();
        bool ok = exitCode == 0;
        string? message = result.FinishedMessage is { Length: > 0 } m ? m : null;
        if (options.Json)
        {
            JsonOutput.Write(new MigrateJson(guest, peer, prepared.DestinationUri, prepared.MigrateUri, prepared.DisksUri,
                ["virsh", .. virshArgs], DryRun: false, exitCode, ok, result.TotalSent, result.TotalSaved,
                [.. result.Streams.Select(s => new StreamJson(s.Key, s.Value.Sent, s.Value.Saved))], message),
                JsonOutput.LineContext.MigrateJson);
        }
        else if (ok)
        {
            Console.Out.WriteLine($"migrated {guest} to {peer}: sent {Format.Bytes(result.TotalSent)}, saved {Format.Bytes(result.TotalSaved)}"
                + $" ({Format.Percent(result.TotalSaved, result.TotalSent + result.TotalSaved)} of the trip)");
        }
        if (!ok)
        {
            throw new CommandFailedException($"virsh migrate of {guest} to {peer} failed (exit status {exitCode})"
                + (message is null ? "" : $": {message}"));
        }
        return 0;
    }

    /// <summary>The guest's name and UUID as the daemon knows them: signals may name it either way.</summary>
    private static IReadOnlySet<string> AliasesOf(DaemonClient client, string guest)
    {
        var aliases = new HashSet<string>(StringComparer.OrdinalIgnoreCase) { guest };
        IReadOnlyList<RetainedGuest> known;
        try
        {
            known = client.ListGuests();
        }
        catch (CommandFailedException)
        {
            // Only costs progress shown for signals naming the guest the other way; the trip itself is unaffected.
            return aliases;
        }
        foreach (RetainedGuest g in known)
        {
            if (string.Equals(g.Name, guest, StringComparison.Ordinal) || string.Equals(g.Uuid, guest, StringComparison.OrdinalIgnoreCase))
            {
                aliases.Add(g.Name);
                aliases.Add(g.Uuid);
            }
        }
        return aliases;
    }

    private static int RunVirsh(string[] arguments)
    {
        var start = new ProcessStartInfo("virsh", arguments) { UseShellExecute = false };
        // Ctrl+C reaches virsh too (same process group), which aborts the migration job cleanly;
        // we stay to report how it ended instead of dying first.
        ConsoleCancelEventHandler keepRunning = static (_, e) => e.Cancel = true;
        Console.CancelKeyPress += keepRunning;
        try
        {
            using Process virsh = Process.Start(start) ?? throw new CommandFailedException("could not start virsh");
            virsh.WaitForExit();
            return virsh.ExitCode;
        }
        catch (Win32Exception e)
        {
            throw new CommandFailedException($"could not run virsh: {e.Message} (is libvirt-clients installed?)", e);
        }
        finally
        {
            Console.CancelKeyPress -= keepRunning;
        }
    }

    private static void WaitForSignals(DaemonClient client, TransferProgress progress, bool expectFinished)
    {
        try
        {
            client.FlushSignalsAsync().Wait(TimeSpan.FromSeconds(10));
        }
        catch (AggregateException)
        {
            // The daemon went away: whatever arrived is all there is; virsh's status still decides.
        }
        if (expectFinished)
        {
            progress.Finished.Wait(FinishedGrace);
        }
    }
}

/// <summary>One TransferProgress or TransferFinished signal, read while its message is valid.</summary>
internal sealed record TransferSignal(string Member, string Guest, string Peer, string Stream, ulong Sent, ulong Saved, bool Ok, string Message)
{
    /// <summary>The signal, or null for another member or a signature other than the contract's.</summary>
    public static TransferSignal? Read(Message message)
    {
        Reader r = message.GetBodyReader();
        return (message.MemberAsString, message.SignatureAsString) switch
        {
            ("TransferProgress", "ssstt") => new TransferSignal("TransferProgress", r.ReadString(), r.ReadString(), r.ReadString(), r.ReadUInt64(), r.ReadUInt64(), false, ""),
            ("TransferFinished", "ssbs") => new TransferSignal("TransferFinished", r.ReadString(), r.ReadString(), "", 0, 0, r.ReadBool(), r.ReadString()),
            _ => null,
        };
    }
}

/// <summary>Collects TransferProgress/TransferFinished for one guest and peer (signals arrive on the connection's receive loop).</summary>
internal sealed class TransferProgress(string peer, IReadOnlySet<string> guestAliases, ProgressDisplay? display,
    Action<string, ulong, ulong>? jsonLine = null)
{
    private readonly Lock _gate = new();
    private readonly SortedDictionary<string, (ulong Sent, ulong Saved)> _streams = new(StringComparer.Ordinal);
    private string? _finishedMessage;
    private bool? _finishedOk;

    public ManualResetEventSlim Finished { get; } = new();

    public ProgressDisplay? Display => display;

    public sealed record Snapshot(IReadOnlyDictionary<string, (ulong Sent, ulong Saved)> Streams, bool? FinishedOk, string? FinishedMessage)
    {
        public ulong TotalSent => Streams.Values.Aggregate(0UL, (sum, s) => sum + s.Sent);

        public ulong TotalSaved => Streams.Values.Aggregate(0UL, (sum, s) => sum + s.Saved);
    }

    public Snapshot Take()
    {
        lock (_gate)
        {
            return new Snapshot(new SortedDictionary<string, (ulong, ulong)>(_streams, StringComparer.Ordinal), _finishedOk, _finishedMessage);
        }
    }

    public void OnSignal(TransferSignal signal)
    {
        if (!IsOurs(signal.Guest, signal.Peer))
        {
            return;
        }
        if (signal.Member == "TransferProgress")
        {
            Snapshot snapshot;
            lock (_gate)
            {
                _streams[signal.Stream] = (signal.Sent, signal.Saved);
                snapshot = new Snapshot(new SortedDictionary<string, (ulong, ulong)>(_streams, StringComparer.Ordinal), _finishedOk, _finishedMessage);
            }
            display?.Update(snapshot);
            jsonLine?.Invoke(signal.Stream, signal.Sent, signal.Saved);
            return;
        }
        lock (_gate)
        {
            _finishedOk = signal.Ok;
            _finishedMessage = signal.Message;
        }
        display?.Finished(signal.Ok, signal.Message);
        Finished.Set();
    }

    private bool IsOurs(string g, string p) => guestAliases.Contains(g) && string.Equals(p, peer, StringComparison.Ordinal);
}

/// <summary>
/// The progress line. On a terminal it redraws one line with a bar of sent (#) against saved (=),
/// at most 10 times a second; otherwise (logs, pipes) it prints a line when a stream appears and
/// at most one a second besides, so a long trip does not flood a log. The last state is always shown.
/// </summary>
internal sealed class ProgressDisplay(TextWriter output)
{
    private const int BarWidth = 30;
    private readonly Lock _gate = new();
    private readonly bool _redraw = output == Console.Out && !Console.IsOutputRedirected;
    private readonly HashSet<string> _streamsShown = new(StringComparer.Ordinal);
    private long _lastShown;
    private TransferProgress.Snapshot? _pending;
    private int _lastLength;
    private bool _lineOpen;

    private TimeSpan MinInterval => _redraw ? TimeSpan.FromMilliseconds(100) : TimeSpan.FromSeconds(1);

    public void Update(TransferProgress.Snapshot snapshot)
    {
        lock (_gate)
        {
            bool newStream = snapshot.Streams.Keys.Any(k => !_streamsShown.Contains(k));
            if (newStream || Stopwatch.GetElapsedTime(_lastShown) >= MinInterval)
            {
                Show(snapshot);
            }
            else
            {
                _pending = snapshot;
            }
        }
    }

    public void Finished(bool ok, string message)
    {
        lock (_gate)
        {
            ShowPending();
            CloseLine();
            output.WriteLine(ok ? $"transfer finished{(message.Length > 0 ? ": " + message : "")}" : $"transfer failed: {message}");
        }
    }

    public void Finish()
    {
        lock (_gate)
        {
            ShowPending();
            CloseLine();
        }
    }

    private void ShowPending()
    {
        if (_pending is { } pending)
        {
            Show(pending);
        }
    }

    private void Show(TransferProgress.Snapshot snapshot)
    {
        _pending = null;
        _lastShown = Stopwatch.GetTimestamp();
        _streamsShown.UnionWith(snapshot.Streams.Keys);
        string line = Line(snapshot);
        if (_redraw)
        {
            output.Write('\r' + line.PadRight(_lastLength));
            _lastLength = line.Length;
            _lineOpen = true;
        }
        else
        {
            output.WriteLine(line);
        }
        output.Flush();
    }

    private void CloseLine()
    {
        if (_lineOpen)
        {
            output.WriteLine();
            _lineOpen = false;
        }
    }

    /// <summary>"[####==========] sent 12.0 MiB, saved 1.0 GiB (98.8%) | memory 4.0 MiB/512.0 MiB, vda 8.0 MiB/512.0 MiB".</summary>
    public static string Line(TransferProgress.Snapshot s)
    {
        ulong sent = s.TotalSent, saved = s.TotalSaved, all = sent + saved;
        int sentCells = all == 0 ? 0 : (int)Math.Ceiling(BarWidth * (double)sent / all);
        string bar = new string('#', sentCells) + new string('=', BarWidth - sentCells);
        string streams = string.Join(", ", s.Streams.Select(p => $"{p.Key} {Format.Bytes(p.Value.Sent)}/{Format.Bytes(p.Value.Saved)}"));
        return $"[{bar}] sent {Format.Bytes(sent)}, saved {Format.Bytes(saved)} ({Format.Percent(saved, all)} saved) | {streams} (sent/saved)";
    }
}
