using System.Net.Sockets;
using BFMig.Daemon.Api;
using BFMig.Daemon.Configuration;
using BFMig.Daemon.Guests;
using BFMig.Daemon.Sockets;
using BFMig.Transfer.Wire;

namespace BFMig.Daemon;

/// <summary>
/// The host self-check behind <c>bfmig doctor</c>: each check says what it found, so that a
/// failed one tells the operator what to fix.
/// </summary>
internal sealed class HostDoctor(DaemonOptions options, LibvirtWatcher? libvirt, string transparentState = "off: not started")
{
    private static readonly TimeSpan PeerTimeout = TimeSpan.FromSeconds(2);
    private const UnixFileMode AnyExecute = UnixFileMode.UserExecute | UnixFileMode.GroupExecute | UnixFileMode.OtherExecute;

    public IReadOnlyList<DoctorCheck> Run()
    {
        var checks = new List<DoctorCheck>
        {
            Hook(),
            Libvirt(),
            RuntimeDirectory(),
            StateDirectory(),
            Helper(),
            Authentication(),
            Transparent(),
        };
        // Peers are probed in parallel: each may take the whole timeout.
        var probes = options.Peers.Select(p => Task.Run(() => Peer(p))).ToArray();
        Task.WaitAll(probes);
        checks.AddRange(probes.Select(t => t.Result));
        return checks;
    }

    private DoctorCheck Hook()
    {
        var path = options.HookPath;
        if (!File.Exists(path))
            return new("hook", false, $"{path} is missing: install bfmig-hook there and send libvirtd SIGHUP");
        var mode = File.GetUnixFileMode(path);
        return (mode & AnyExecute) == 0
            ? new("hook", false, $"{path} is not executable (mode {Octal(mode)}): chmod 0755 it")
            : new("hook", true, $"{path} present, mode {Octal(mode)}");
    }

    private DoctorCheck Libvirt() => libvirt?.IsConnected == true
        ? new("libvirt", true, $"connected to {options.LibvirtUri}")
        : new("libvirt", false, $"not connected to {options.LibvirtUri}: is libvirtd (or virtqemud) running?");

    private DoctorCheck RuntimeDirectory()
    {
        var problems = new List<string>();
        foreach (var dir in options.Peers.Select(p => p.Name).Append(options.HostName).Prepend(""))
        {
            var path = Path.Combine(options.RuntimeDirectory, dir);
            if (!Directory.Exists(path))
            {
                problems.Add($"{path} missing");
                continue;
            }
            var mode = File.GetUnixFileMode(path);
            var expected = dir == options.HostName ? MigrationSockets.OwnDirectoryMode : MigrationSockets.DirectoryMode;
            if ((mode & ~expected) != 0)
                problems.Add($"{path} has mode {Octal(mode)}, expected at most {Octal(expected)}");
        }
        return problems.Count == 0
            ? new("runtime_dir", true, $"{options.RuntimeDirectory} and its per-host directories exist, reachable only by root and {options.QemuUser}:{options.QemuGroup}")
            : new("runtime_dir", false, string.Join("; ", problems));
    }

    private DoctorCheck StateDirectory()
    {
        var path = options.StateDirectory;
        if (!Directory.Exists(path))
            return new("state_dir", false, $"{path} is missing");
        var mode = File.GetUnixFileMode(path);
        const UnixFileMode others = UnixFileMode.GroupWrite | UnixFileMode.OtherRead | UnixFileMode.OtherWrite | UnixFileMode.OtherExecute;
        return (mode & others) != 0
            ? new("state_dir", false, $"{path} has mode {Octal(mode)}: guest memory lives there, make it 0700")
            : new("state_dir", true, $"{path}, mode {Octal(mode)}");
    }

    private DoctorCheck Helper()
    {
        try
        {
            var helper = StartupChecks.LocateHelper(options);
            return (File.GetUnixFileMode(helper) & AnyExecute) == 0
                ? new("transfer_helper", false, $"{helper} is not executable")
                : new("transfer_helper", true, helper);
        }
        catch (ConfigurationException e)
        {
            return new("transfer_helper", false, e.Message);
        }
    }

    // The helpers load the same files per stream; a problem here would fail every migration.
    private DoctorCheck TlsCertificates()
    {
        var found = new List<string>();
        foreach (var (role, cert, key) in new[] { ("server", options.TlsCertificate, options.TlsKey), ("client", options.TlsClientCertificate, options.TlsClientKey) })
        {
            try
            {
                using var certificate = System.Security.Cryptography.X509Certificates.X509Certificate2.CreateFromPemFile(cert, key);
                var notAfter = certificate.NotAfter.ToUniversalTime();
                if (notAfter < DateTime.UtcNow || certificate.NotBefore.ToUniversalTime() > DateTime.UtcNow)
                    return new("auth", false, $"{role} certificate {cert} is not valid now (valid {certificate.NotBefore.ToUniversalTime():yyyy-MM-dd} to {notAfter:yyyy-MM-dd})");
                found.Add($"{role} {cert} ({certificate.Subject}, until {notAfter:yyyy-MM-dd})");
            }
            catch (Exception e) when (e is System.Security.Cryptography.CryptographicException or IOException or UnauthorizedAccessException or ArgumentException)
            {
                return new("auth", false, $"cannot load the {role} certificate {cert} with key {key}: {e.Message}");
            }
        }
        if (!File.Exists(options.TlsCaCertificate))
            return new("auth", false, $"CA certificate {options.TlsCaCertificate} does not exist");
        return new("auth", true, $"mutual TLS: {string.Join("; ", found)}; CA {options.TlsCaCertificate}");
    }

    /// <summary>
    /// What transparent mode needs: nftables in the kernel and libnftables (the daemon's table is
    /// the proof), qemu.conf's migration port range, the QEMU user. Off by configuration passes
    /// with a note (explicit mode still works); on but failed to start does not.
    /// </summary>
    private DoctorCheck Transparent()
    {
        if (!options.Transparent)
            return new("transparent", true, $"off ({(options.Peers.Count == 0 ? "no peers configured" : "daemon:transparent = no")}): only migrations through BFMig's socket URIs (bfmig migrate) are accelerated");
        string range;
        try
        {
            range = BFMig.Daemon.Transparent.MigrationPortRange.Read(options.QemuConf).ToString();
        }
        catch (Exception e) when (e is FormatException or IOException or UnauthorizedAccessException)
        {
            return new("transparent", false, $"{e.Message}: fix migration_port_min/max in {options.QemuConf}");
        }
        if (transparentState.Contains("migration port range", StringComparison.Ordinal))
            return new("transparent", false, $"{transparentState}: give the peer a BFMig port outside it ([peers:NAME] address = HOST:PORT)");
        if (transparentState.Contains("no peer has an address", StringComparison.Ordinal))
            return new("transparent", false, $"{transparentState}: check each [peers:NAME] address and migration_addresses (resolvable, and one peer's only)");
        if (!transparentState.StartsWith("on", StringComparison.Ordinal))
            return new("transparent", false, $"{transparentState}. Needs nf_tables in the kernel (modprobe nf_tables), libnftables1, CAP_NET_ADMIN and a free 127.0.0.1:{options.TransparentPort} (daemon:transparent_port); or set daemon:transparent = no");
        string table;
        try
        {
            using var nft = BFMig.Native.Netfilter.NftContext.Open();
            table = nft.Run($"list table inet {BFMig.Daemon.Transparent.RedirectTable.TableName}");
        }
        catch (BFMig.Native.Netfilter.NftablesException e)
        {
            return new("transparent", false, $"the redirect table is missing although transparent mode started ({e.Message}): restart bfmigd");
        }
        return table.Contains("redirect", StringComparison.Ordinal)
            ? new("transparent", true, $"{transparentState}; qemu.conf migration ports {range}; QEMU user {options.QemuUser}")
            : new("transparent", false, "table inet bfmig has no redirect rule: restart bfmigd");
    }

    private DoctorCheck Authentication()
    {
        if (options.AuthMode == PeerAuthMode.Tls)
            return TlsCertificates();
        try
        {
            return PskPeerAuthenticator.KeyFileProblem(options.PskFile!) is { } problem
                ? new("auth", false, problem)
                : new("auth", true, $"pre-shared key {options.PskFile}, {new FileInfo(options.PskFile!).Length} bytes");
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            return new("auth", false, $"cannot read {options.PskFile}: {e.Message}");
        }
    }

    private static DoctorCheck Peer(PeerOptions peer)
    {
        var name = $"peer:{peer.Name}";
        try
        {
            using var socket = new Socket(SocketType.Stream, ProtocolType.Tcp);
            using var cts = new CancellationTokenSource(PeerTimeout);
            socket.ConnectAsync(peer.Host, peer.Port, cts.Token).AsTask().GetAwaiter().GetResult();
            return new(name, true, $"{peer.Host}:{peer.Port} accepts connections");
        }
        catch (OperationCanceledException)
        {
            return new(name, false, $"{peer.Host}:{peer.Port}: no answer within {PeerTimeout.TotalSeconds:F0} s (firewall, or bfmigd not running there)");
        }
        catch (SocketException e)
        {
            return new(name, false, $"{peer.Host}:{peer.Port}: {e.Message}");
        }
    }

    private static string Octal(UnixFileMode mode) => "0" + Convert.ToString((int)mode, 8);
}
