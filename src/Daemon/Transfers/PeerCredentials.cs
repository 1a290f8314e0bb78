using BFMig.Daemon.Configuration;
using BFMig.Transfer.Wire;

namespace BFMig.Daemon.Transfers;

/// <summary>
/// How this host proves itself to a peer and checks the peer, by role, in either
/// <c>auth:mode</c>: the one place that picks the files and the names a peer's certificate must
/// carry. Helpers get them as arguments (<see cref="TransferManager"/>); the daemon's own
/// checkpoint exchange builds its authenticator here.
/// </summary>
public static class PeerCredentials
{
    /// <summary>
    /// The name the receiver's certificate must carry when this host connects to
    /// <paramref name="peer"/> (its configured address, as libvirt's qemu+tls:// client checks);
    /// null when <c>auth:tls_verify_peer_name</c> is off.
    /// </summary>
    public static string? ReceiverName(DaemonOptions options, PeerOptions peer) => options.TlsVerifyPeerName ? peer.Host : null;

    /// <summary>
    /// The names of which a sender's certificate must carry one when it claims to be
    /// <paramref name="peerName"/> (that peer's address or its <c>[peers:NAME]</c> name); null when
    /// the check is off or no such peer is configured (the listener refuses those first).
    /// </summary>
    public static string? SenderNames(DaemonOptions options, string peerName) =>
        options.TlsVerifyPeerName && options.Peers.FirstOrDefault(p => p.Name == peerName) is { } claimed
            ? claimed.Host == claimed.Name ? claimed.Host : $"{claimed.Host},{claimed.Name}"
            : null;

    /// <summary>The CA's revocation list when the file exists (libvirt's default place may hold none).</summary>
    public static string? RevocationList(DaemonOptions options) => File.Exists(options.TlsCrl) ? options.TlsCrl : null;

    /// <summary>
    /// The authenticator for a connection this host opens to <paramref name="peer"/>: in TLS mode
    /// this host is the client, with libvirt's client certificate. Throws
    /// <see cref="PeerAuthenticationException"/> naming a file that cannot be used.
    /// </summary>
    public static IPeerAuthenticator ForSending(DaemonOptions options, PeerOptions peer) => options.AuthMode == PeerAuthMode.Psk
        ? PskPeerAuthenticator.FromFile(options.PskFile!)
        : TlsPeerAuthenticator.FromPemFiles(options.TlsClientCertificate, options.TlsClientKey, options.TlsCaCertificate, ReceiverName(options, peer),
            RevocationList(options));

    /// <summary>The authenticator for a connection a peer opened, claiming to be <paramref name="peerName"/>: in TLS mode this host is the server.</summary>
    public static IPeerAuthenticator ForReceiving(DaemonOptions options, string peerName) => options.AuthMode == PeerAuthMode.Psk
        ? PskPeerAuthenticator.FromFile(options.PskFile!)
        : TlsPeerAuthenticator.FromPemFiles(options.TlsCertificate, options.TlsKey, options.TlsCaCertificate, SenderNames(options, peerName),
            RevocationList(options));
}
