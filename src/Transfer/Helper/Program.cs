using System.Net.Sockets;
using System.Runtime.InteropServices;
using System.Text.Json;
using BFMig.Native.Compression;
using BFMig.Native.Linux;
using BFMig.Native.Systemd;
using BFMig.Native;
using BFMig.Transfer.Disk;
using BFMig.Transfer.Memory;
using BFMig.Transfer.Store;
using BFMig.Transfer.Wire;

namespace BFMig.Transfer.Helper;

/// <summary>
/// <c>bfmig-transfer send|receive</c>: one migration stream per process. Exit codes: 0 done,
/// 2 usage, 3 peer protocol failure or abort, 4 local stream (QEMU side) failure, 5 authentication
/// failed, 6 timeout, 1 anything else. One line on stderr says what failed.
/// </summary>
internal static class Program
{
    private const string Usage = """
        usage:
          bfmig-transfer send --kind mig|nbd (--listen unix:PATH | --fd N) --peer tcp:HOST:PORT|unix:PATH
                              --guest UUID --peer-name NAME [--store DIR] [--psk-file F] [options]
          bfmig-transfer receive --kind mig|nbd (--listen tcp:HOST:PORT|unix:PATH | --fd N) --connect unix:PATH|tcp:HOST:PORT
                              --guest UUID [--store DIR] [--psk-file F] [options]
        options: --stats FILE  --compress auto|zstd|lz4|none  --zstd-level N  --no-store
                 --idle-timeout SECONDS  --accept-timeout SECONDS  --name LOCALNAME
                 --image EXPORT=FORMAT:PATH (repeatable: the image behind an NBD export on this host)
                 --tls-cert F --tls-key F --tls-ca F [--tls-peer-name NAME[,NAME...]] [--tls-crl F]
                              (mutual TLS instead of --psk-file; the peer's certificate must name one NAME,
                              and must not be on the CA's revocation list F)
                 --progress-fd N (JSON lines with live counters, about every 0.5 s)
                 --target-port N (send, transparent mode: the peer port QEMU aimed at, sent in a route frame)
                 --route-first (receive: a route frame precedes the hello)
                 --follows-main (send, kind mig: the guest's main memory stream is already being sent from here; a connection
                              QEMU keeps silent for 100 ms is its post-copy preempt channel, carried without an idle timeout)
                 --post-copy-armed (send, kind mig: as --follows-main, and the main stream's helper reported post-copy RAM
                              advised and iterating: a connection with no bytes already waiting is the preempt channel, at once)
                 --qemu-pid-file F (receive: the local socket must be served by the process named there, libvirt's pid file of the guest)
                 --rehash-rate MBPS (receive, kind nbd: read rate cap when re-hashing a retained raw image whose identity cannot prove it, e.g. a block device; 0: never; default 400)
                 --qemu-user NAME (kind nbd: the QEMU user, who may own a guest's block device while libvirt lends it to QEMU)
                 --max-ram BYTES (receive, kind mig: the incoming guest's memory; caps the RAM layout a peer may declare)
                 --commit-after-resume (receive, kind mig: commit the store once SIGCONT says the guest runs here, at most 3 s after the stream's end)
        """;

    /// <summary>
    /// Before the first byte from a peer or a QEMU: bfmigd starts this helper as root, and it
    /// parses what the network sends (before authentication, too). It keeps only what it needs
    /// (<see cref="HelperCapabilities"/>), then runs itself again, so that no thread of the
    /// runtime's, started before Main, keeps more. Whether there is anything to drop is read from
    /// this thread's own permitted set, never from anything its starter could set: the image run
    /// again (or a helper not started as root) finds nothing, and only sets no_new_privs.
    /// Returns what could not be done (null: all).
    /// </summary>
    private static string? Narrow(string[] args)
    {
        Capabilities.SetName("bfmig-transfer");
        ulong keep = HelperCapabilities.Mask;
        try
        {
            ulong permitted = Capabilities.Permitted();
            if ((permitted & ~keep) == 0)
                return Capabilities.SetNoNewPrivileges() ?? (permitted == 0 ? null : Capabilities.BoundingLeft(keep));
            string? notDone = Capabilities.KeepOnly(HelperCapabilities.Kept);
            // Running again helps only once this thread is narrowed and can gain nothing by an exec
            // (no_new_privs): else the new image, uid 0, would be given its capabilities back and
            // start over, for ever.
            if ((Capabilities.Permitted() & ~keep) != 0 || !Capabilities.NoNewPrivileges())
                return notDone ?? "this thread still holds, or could regain, capabilities it should not: not run again";
            string failed = Capabilities.RunAgain(args);
            return notDone is null ? failed : $"{notDone}; {failed}";
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException or FormatException)
        {
            return $"cannot read or narrow this thread's capabilities: {e.Message}";
        }
    }

    private static async Task<int> Main(string[] args)
    {
        // The library's notes go where this process's own errors go: stderr, read by bfmigd and the lab.
        TransferLog.UseSink(Console.Error.WriteLine);
        if (args is ["--version"])
        {
            Console.WriteLine($"bfmig-transfer {BuildInfo.Version}");
            return 0;
        }
        string? notNarrowed = Narrow(args);
        if (args is ["--capabilities"])
        {
            // What a stream's helper is left with, on every thread (an operator's check, and the tests').
            Console.WriteLine($"effective {Capabilities.EffectiveOfAnyThread():x16} bounding {Capabilities.Bounding():x16}"
                + (notNarrowed is null ? "" : $" (not done: {notNarrowed})"));
            return 0;
        }
        if (args.Length == 0 || args[0] is not ("send" or "receive"))
        {
            Console.Error.Write(Usage);
            return 2;
        }
        Dictionary<string, string> opts;
        try
        {
            opts = ParseOptions(args.AsSpan(1));
        }
        catch (FormatException e)
        {
            Console.Error.WriteLine($"bfmig-transfer: {e.Message}");
            return 2;
        }
        if (notNarrowed is not null)
            TransferLog.Note($"bfmig-transfer: capabilities not narrowed as they should be: {notNarrowed}");
        using var cts = new CancellationTokenSource();
        Console.CancelKeyPress += (_, e) =>
        {
            e.Cancel = true;
            cts.Cancel();
        };
        // An exception on a thread nobody awaits (a timer, a callback) would otherwise end the
        // process with SIGABRT and no stats: report it like any other failure first.
        AppDomain.CurrentDomain.UnhandledException += (_, e) =>
        {
            Report(args[0], opts, null, $"internal error: {(e.ExceptionObject as Exception)?.GetType().Name}: {(e.ExceptionObject as Exception)?.Message}");
            Environment.Exit(1);
        };
        string? orphaned = null;
        // Handed a socket by bfmigd (--fd): if the daemon dies, give the stream up (see ParentWatch).
        await using var parentWatch = opts.ContainsKey("fd")
            ? ParentWatch.Start(TimeSpan.FromMilliseconds(50), () =>
            {
                orphaned = "the daemon that started this helper exited; stream given up";
                cts.Cancel();
                // Cancellation unwinds the stream (the store is abandoned); should anything not
                // unwind, do not outlive the daemon for long.
                _ = Task.Delay(TimeSpan.FromSeconds(10)).ContinueWith(_ => Environment.Exit(1), TaskScheduler.Default);
            })
            : null;
        TransferStats? stats = null;
        string? error = null;
        int code;
        try
        {
            var o = BuildOptions(opts, args[0] == "send", () => Volatile.Write(ref s_peerProved, true));
            stats = args[0] == "send" ? await SendAsync(opts, o, cts.Token) : await ReceiveAsync(opts, o, cts.Token);
            code = 0;
        }
        catch (FormatException e)
        {
            error = e.Message;
            code = 2;
        }
        catch (PeerAuthenticationException e)
        {
            error = e.Message;
            code = 5;
        }
        catch (PeerProtocolException e)
        {
            error = e.Message;
            code = 3;
        }
        catch (TimeoutException e)
        {
            error = e.Message;
            code = 6;
        }
        catch (Exception e) when (e is IOException or SocketException or CompressionException or Disk.Nbd.NbdProtocolException)
        {
            // An NBD stream that ended mid-message or that a side broke (the message says which
            // and where) fails the stream like a cut socket: a reason and exit 4. It is mostly a
            // QEMU that went away in a cancelled migration, never a fault of this helper's own.
            error = $"{e.GetType().Name}: {e.Message}";
            code = 4;
        }
        catch (Exception e) when (e is StoreException or UnauthorizedAccessException or OperationCanceledException)
        {
            error = orphaned ?? e.Message;
            code = 1;
        }
        catch (Exception e)
        {
            // Whatever a peer or QEMU made this helper do, it ends reported: a reason in the stats
            // and a non-zero exit, never an unhandled exception (SIGABRT, no stats, store in flux
            // with nobody saying why).
            error = $"internal error: {e.GetType().Name}: {e.Message}";
            code = 1;
        }
        Report(args[0], opts, stats, error);
        return code;
    }

    // Set once a receiver's peer has proved itself (TransferOptions.PeerProved): whatever fails after that is this host's to hear of.
    private static bool s_peerProved;

    /// <summary>The helper's last words: the failure on stderr and, with <c>--stats</c>, the stats file with its reason.</summary>
    private static void Report(string role, Dictionary<string, string> opts, TransferStats? stats, string? error)
    {
        // A receiver whose peer never proved itself says nothing here when it writes stats: bfmigd
        // logs that failure from them under the peer port's rate limit, and a line of its own per
        // connection would let anyone who can connect flood the journal.
        bool unproven = role == "receive" && opts.ContainsKey("stats") && !Volatile.Read(ref s_peerProved);
        if (error is not null && !unproven) Console.Error.WriteLine($"bfmig-transfer {role}: {LogText.Escape(error)}");
        if (opts.TryGetValue("stats", out var statsPath))
        {
            stats ??= new TransferStats { Role = role, Authenticated = Volatile.Read(ref s_peerProved) };
            stats.Error = error;
            try
            {
                File.WriteAllBytes(statsPath, JsonSerializer.SerializeToUtf8Bytes(stats, StatsJsonContext.Default.TransferStats));
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException)
            {
                Console.Error.WriteLine($"bfmig-transfer: cannot write stats to {statsPath}: {e.Message}");
            }
        }
    }

    private static readonly HashSet<string> Flags = ["no-store", "route-first", "commit-after-resume", "follows-main", "post-copy-armed"];
    private static readonly HashSet<string> Valued =
        ["kind", "listen", "fd", "peer", "connect", "store", "guest", "peer-name", "psk-file", "stats", "compress", "zstd-level",
         "idle-timeout", "accept-timeout", "name", "tls-cert", "tls-key", "tls-ca", "tls-peer-name", "tls-crl", "progress-fd", "target-port",
         "max-ram", "qemu-pid-file", "qemu-user", "rehash-rate"];

    // --image may be given once per export; its values are kept under "image" joined by NUL.
    private const string Repeated = "image";

    private static Dictionary<string, string> ParseOptions(ReadOnlySpan<string> args)
    {
        var d = new Dictionary<string, string>(StringComparer.Ordinal);
        for (int i = 0; i < args.Length; i++)
        {
            if (!args[i].StartsWith("--", StringComparison.Ordinal)) throw new FormatException($"unexpected argument '{args[i]}'");
            string name = args[i][2..];
            if (Flags.Contains(name))
            {
                d[name] = "";
                continue;
            }
            if (!Valued.Contains(name) && name != Repeated) throw new FormatException($"unknown option --{name}");
            if (i + 1 >= args.Length) throw new FormatException($"--{name} needs a value");
            string value = args[++i];
            if (name == Repeated && d.TryGetValue(name, out var earlier))
                value = earlier + "\0" + value;
            else if (d.ContainsKey(name))
                throw new FormatException($"--{name} given twice");
            d[name] = value;
        }
        return d;
    }

    // --rehash-rate MB/s (0: never re-hash).
    private static DiskRehashLimits? RehashLimits(Dictionary<string, string> d)
    {
        long rate = d.TryGetValue("rehash-rate", out var r) ? ParseLong(r, "rehash-rate") : DiskRehashLimits.Default.BytesPerSecond / 1_000_000;
        return rate <= 0 ? null : DiskRehashLimits.Default with { BytesPerSecond = rate * 1_000_000 };
    }

    // --qemu-user: who may own a guest's block device while libvirt lends it to QEMU.
    private static NodeOwner QemuUser(string name) =>
        UnixUsers.GetUser(name) is { } u ? new NodeOwner(u.Uid, u.Gid) : throw new FormatException($"--qemu-user {name}: no such user");

    private static string Required(Dictionary<string, string> d, string name) =>
        d.TryGetValue(name, out var v) ? v : throw new FormatException($"--{name} is required");

    private static TransferOptions BuildOptions(Dictionary<string, string> d, bool send, Action peerProved)
    {
        var kind = Required(d, "kind") switch
        {
            "mig" => StreamKind.Mig,
            "nbd" => StreamKind.Nbd,
            var k => throw new FormatException($"--kind {k}: expected mig or nbd"),
        };
        if (!Guid.TryParse(Required(d, "guest"), out var guest)) throw new FormatException($"--guest {d["guest"]}: not a UUID");
        var compression = (d.GetValueOrDefault("compress") ?? "auto") switch
        {
            "auto" => CompressionMode.Auto,
            "zstd" => CompressionMode.Zstd,
            "lz4" => CompressionMode.Lz4,
            "none" => CompressionMode.None,
            var c => throw new FormatException($"--compress {c}: expected auto, zstd, lz4 or none"),
        };
        var images = new Dictionary<string, DiskImageSpec>(StringComparer.Ordinal);
        foreach (string spec in d.TryGetValue(Repeated, out var all) ? all.Split('\0') : [])
        {
            var (export, image) = DiskImageSpec.Parse(spec);
            if (!images.TryAdd(export, image)) throw new FormatException($"--image: export '{export}' given twice");
        }
        return new TransferOptions
        {
            PeerProved = peerProved,
            Kind = kind,
            Guest = guest,
            StoreRoot = d.ContainsKey("no-store") ? null : d.GetValueOrDefault("store") ?? MemoryStore.DefaultRoot,
            // A receiver checks that the hello names the sender its daemon routed the connection for.
            PeerName = send ? Required(d, "peer-name") : d.GetValueOrDefault("peer-name", ""),
            LocalName = d.GetValueOrDefault("name") ?? Environment.MachineName,
            Authenticator = Authenticator(d),
            Compression = compression,
            ZstdLevel = d.TryGetValue("zstd-level", out var lvl) ? ParseInt(lvl, "zstd-level") : 1,
            IdleTimeout = TimeSpan.FromSeconds(d.TryGetValue("idle-timeout", out var it) ? ParseInt(it, "idle-timeout") : 120),
            DiskImages = images,
            Rehash = RehashLimits(d),
            QemuUser = d.TryGetValue("qemu-user", out var user) ? QemuUser(user) : null,
            MaxRamBytes = d.TryGetValue("max-ram", out var mr) ? RamLimit.ForGuest(ParseLong(mr, "max-ram")) : 0,
            Progress = d.TryGetValue("progress-fd", out var pfd) ? ProgressWriter.Open(ParseInt(pfd, "progress-fd")).Write : null,
            TargetPort = d.TryGetValue("target-port", out var tp) ? ParsePort(tp) : (ushort)0,
            RouteFirst = d.ContainsKey("route-first"),
            FollowsMain = send && (d.ContainsKey("follows-main") || d.ContainsKey("post-copy-armed")),
            MainPostCopyArmed = send && d.ContainsKey("post-copy-armed"),
            GuestRuns = !send && d.ContainsKey("commit-after-resume") ? GuestRunsSignal() : null,
            AwaitMainChannel = !send && d.TryGetValue("connect", out var connect)
                ? t => MainChannelGate.WaitAsync(Endpoint.Parse(connect), MainChannelGate.DefaultTimeout, t)
                : null,
        };
    }

    // Held for the process's life: disposing it would hand SIGCONT back to its default action.
    private static PosixSignalRegistration? _guestRunsRegistration;

    // bfmigd sends SIGCONT once libvirt reports the guest resumed on this host (MigReceiver.GuestRuns).
    // SIGCONT because its default action does nothing: a signal that came before this registration,
    // or to a helper that never made one, cannot end the process.
    private static Task GuestRunsSignal()
    {
        var runs = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        _guestRunsRegistration = PosixSignalRegistration.Create(PosixSignal.SIGCONT, _ => runs.TrySetResult());
        return runs.Task;
    }

    private static IPeerAuthenticator Authenticator(Dictionary<string, string> d)
    {
        string[] tls = ["tls-cert", "tls-key", "tls-ca"];
        int given = tls.Count(d.ContainsKey);
        if (given == 0)
        {
            if (d.ContainsKey("tls-peer-name") || d.ContainsKey("tls-crl")) throw new FormatException("--tls-peer-name and --tls-crl need --tls-cert, --tls-key and --tls-ca");
            return d.TryGetValue("psk-file", out var psk) ? PskPeerAuthenticator.FromFile(psk) : NoPeerAuthenticator.Instance;
        }
        if (given != tls.Length) throw new FormatException("TLS needs all of --tls-cert, --tls-key and --tls-ca");
        if (d.ContainsKey("psk-file")) throw new FormatException("--psk-file and --tls-* exclude each other");
        return TlsPeerAuthenticator.FromPemFiles(d["tls-cert"], d["tls-key"], d["tls-ca"], d.GetValueOrDefault("tls-peer-name"), d.GetValueOrDefault("tls-crl"));
    }

    private static ushort ParsePort(string s) =>
        ushort.TryParse(s, out ushort v) && v != 0 ? v : throw new FormatException($"--target-port {s}: not a TCP port (1-65535)");

    private static long ParseLong(string s, string name) =>
        long.TryParse(s, out long v) && v > 0 ? v : throw new FormatException($"--{name} {s}: not a positive number");

    private static int ParseInt(string s, string name) =>
        int.TryParse(s, out int v) ? v : throw new FormatException($"--{name} {s}: not a number");

    private static TimeSpan AcceptTimeout(Dictionary<string, string> d) =>
        TimeSpan.FromSeconds(d.TryGetValue("accept-timeout", out var s) ? ParseInt(s, "accept-timeout") : 300);

    private static async Task<Socket> ListenOrFdAsync(Dictionary<string, string> d, CancellationToken ct)
    {
        if (d.TryGetValue("fd", out var fd)) return Endpoint.FromFd(ParseInt(fd, "fd"));
        return await Endpoint.Parse(Required(d, "listen")).AcceptOneAsync(AcceptTimeout(d), ct);
    }

    private static async Task<TransferStats> SendAsync(Dictionary<string, string> d, TransferOptions o, CancellationToken ct)
    {
        var peerEndpoint = Endpoint.Parse(Required(d, "peer"));
        var qemuSocket = await ListenOrFdAsync(d, ct);
        await using var qemu = LocalConnection.FromSocket(qemuSocket);
        return await TransferRunner.SendAsync(qemu, t => peerEndpoint.ConnectAsync(o.ConnectTimeout, t), o, ct);
    }

    private static async Task<TransferStats> ReceiveAsync(Dictionary<string, string> d, TransferOptions o, CancellationToken ct)
    {
        var local = Endpoint.Parse(Required(d, "connect"));
        var peer = await ListenOrFdAsync(d, ct);
        var pidFile = d.GetValueOrDefault("qemu-pid-file");
        return await TransferRunner.ReceiveAsync(peer, async t =>
        {
            var socket = await local.ConnectAsync(o.ConnectTimeout, t);
            // Another guest's QEMU (same user and group) could have created this path first.
            if (pidFile is not null && GuestQemu.Check(socket, pidFile) is { } refusal)
            {
                socket.Dispose();
                throw new IOException($"local socket {Required(d, "connect")} refused: {refusal}");
            }
            return LocalConnection.FromSocket(socket);
        }, o, ct);
    }
}
