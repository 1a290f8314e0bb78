namespace BFMig.Daemon.Configuration;

/// <summary>How peers prove who they are on the data link.</summary>
public enum PeerAuthMode
{
    /// <summary>Mutual TLS with the host certificates libvirt's own TLS migration uses.</summary>
    Tls,

    /// <summary>A pre-shared key file (labs and closed networks).</summary>
    Psk,
}

/// <summary>Which compressor the data path uses on the WAN.</summary>
public enum CompressionChoice
{
    /// <summary>Measure the link and the CPU, then pick zstd or LZ4 per stream.</summary>
    Auto,
    Zstd,
    Lz4,
    None,
}

/// <summary>One peer host that guests travel to and from.</summary>
/// <param name="Name">The name used in socket paths (<c>/run/bfmig/NAME/</c>) and in the CLI.</param>
/// <param name="Host">Address or DNS name of the peer's bfmigd.</param>
/// <param name="Port">The peer's bfmigd data port.</param>
/// <param name="LibvirtUri">libvirt URI of the peer, as <c>virsh migrate</c> should be given it.</param>
public sealed record PeerOptions(string Name, string Host, int Port, string LibvirtUri)
{
    /// <summary>
    /// Transparent mode: the addresses QEMU's migration connections to this peer go to
    /// (<c>migration_addresses</c>; default: the addresses of <see cref="Host"/>). A host with a
    /// separate migration network lists that network's addresses here.
    /// </summary>
    public IReadOnlyList<string> MigrationAddresses { get; init; } = [];

    /// <summary>The addresses of <see cref="Host"/>: itself when it is one, else what the name resolves to now (SocketException when it does not).</summary>
    public IEnumerable<System.Net.IPAddress> HostAddresses() =>
        System.Net.IPAddress.TryParse(Host, out var literal) ? [literal] : System.Net.Dns.GetHostAddresses(Host);

    /// <summary>An IPv4 address however it came (an IPv4-mapped IPv6 one as plain IPv4): how peers' addresses are compared.</summary>
    public static System.Net.IPAddress Normalize(System.Net.IPAddress address) => address.IsIPv4MappedToIPv6 ? address.MapToIPv4() : address;
}

/// <summary>Everything bfmigd reads from <c>/etc/bfmig/bfmig.conf</c>, the environment and its command line.</summary>
public sealed record DaemonOptions
{
    public required string HostName { get; init; }
    public required string StateDirectory { get; init; }
    public required string RuntimeDirectory { get; init; }
    public required string LibvirtUri { get; init; }
    public required string ListenAddress { get; init; }
    public required int ListenPort { get; init; }
    public required string QemuUser { get; init; }
    public required string QemuGroup { get; init; }

    /// <summary>Where libvirt keeps its QEMU pid files (<c>GUEST.pid</c>): a socket accepts only the guest's own QEMU.</summary>
    public string QemuPidDirectory { get; init; } = BFMig.Native.Linux.GuestQemu.DefaultPidDirectory;
    public required string LogLevel { get; init; }
    public required PeerAuthMode AuthMode { get; init; }
    public required string? PskFile { get; init; }
    public required string TlsCertificate { get; init; }
    public required string TlsKey { get; init; }
    public required string TlsCaCertificate { get; init; }

    /// <summary>The certificate this host presents when it connects to a peer (libvirt's client certificate).</summary>
    public string TlsClientCertificate { get; init; } = "/etc/pki/libvirt/clientcert.pem";

    /// <summary>The key of <see cref="TlsClientCertificate"/>.</summary>
    public string TlsClientKey { get; init; } = "/etc/pki/libvirt/private/clientkey.pem";

    /// <summary>
    /// The CA's certificate revocation list; used when the file exists (libvirt's default place).
    /// A peer whose certificate is on it is refused in both directions.
    /// </summary>
    public string TlsCrl { get; init; } = "/etc/pki/CA/cacrl.pem";

    /// <summary>
    /// Require the peer's certificate to name it: when connecting, the peer's configured address
    /// (as libvirt's qemu+tls:// client does); when accepting, the configured address or the
    /// <c>[peers:NAME]</c> name of the peer the sender claims to be.
    /// </summary>
    public bool TlsVerifyPeerName { get; init; } = true;
    public required CompressionChoice Compression { get; init; }
    public required int BufferMiB { get; init; }
    public required IReadOnlyList<PeerOptions> Peers { get; init; }

    /// <summary>
    /// The group whose members may call the read-only methods that reveal guests or make the host
    /// work (ListGuests, Estimate, Doctor) without being root (<c>daemon:admin_group</c>); null:
    /// root only.
    /// </summary>
    public string? AdminGroup { get; init; }

    /// <summary>D-Bus address to use instead of the system bus (<c>unix:path=...</c>; tests and labs).</summary>
    public string? BusAddress { get; init; }

    /// <summary>Where the libvirt hook should be installed; <c>Doctor</c> checks it.</summary>
    public string HookPath { get; init; } = "/etc/libvirt/hooks/qemu.d/50-bfmig";

    /// <summary>
    /// Read rate cap (MB/s) of a receiver re-hashing a retained raw image that its identity cannot
    /// prove (a block device, a file touched since); the host's re-hashes run one at a time, so
    /// it caps the host. 0: never re-hash (such disks are sent whole).
    /// </summary>
    public int RehashRateMBps { get; init; } = 400;

    /// <summary>The <c>bfmig-transfer</c> executable; null means the installed one (see <c>TransferHelperLocator</c>).</summary>
    public string? TransferHelper { get; init; }

    /// <summary>Streams (helpers) running at once, both directions together; more are refused.</summary>
    public int MaxTransfers { get; init; } = DaemonConfiguration.DefaultMaxTransfers(Environment.ProcessorCount);

    /// <summary>
    /// Transparent mode (<c>daemon:transparent</c>, default yes when peers are configured): ordinary
    /// <c>tcp://</c> migrations to a peer are redirected through BFMig (see <c>Transparent/</c>).
    /// </summary>
    public bool Transparent { get; init; }

    /// <summary>The loopback port the redirect points at (<c>daemon:transparent_port</c>; 0 = any free port).</summary>
    public int TransparentPort { get; init; } = 16601;

    /// <summary>How long an intercepted connection may stay silent before it is taken for the NBD stream.</summary>
    public int TransparentSilenceMilliseconds { get; init; } = 300;

    /// <summary>libvirt's qemu.conf, for the migration port range (<c>daemon:qemu_conf</c>).</summary>
    public string QemuConf { get; init; } = "/etc/libvirt/qemu.conf";

    /// <summary>On SIGTERM, how long running transfers may still finish before they are killed.</summary>
    public int ShutdownGraceSeconds { get; init; } = 20;

    /// <summary>
    /// What the host retains at most (<c>[retention]</c>): beyond it bfmigd evicts departure
    /// snapshots, oldest first (see <c>Guests/RetentionPolicy</c>).
    /// </summary>
    public Guests.RetentionLimits Retention { get; init; } = Guests.RetentionLimits.None;
}
