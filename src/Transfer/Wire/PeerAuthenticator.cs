using System.Net.Security;
using System.Security.Authentication;
using System.Security.Cryptography;
using System.Security.Cryptography.X509Certificates;

namespace BFMig.Transfer.Wire;

/// <summary>
/// How two helpers prove who they are. The daemon picks one: mutual TLS with libvirt's host
/// certificates (<see cref="TlsPeerAuthenticator"/>) or a pre-shared key (<see cref="PskPeerAuthenticator"/>).
/// </summary>
public interface IPeerAuthenticator
{
    /// <summary>Wraps the raw connection (TLS returns an authenticated SslStream; PSK returns it unchanged).</summary>
    ValueTask<Stream> SecureAsync(Stream transport, bool isInitiator, string peerName, CancellationToken ct);

    /// <summary>Length of a hello proof; 0 when the transport already authenticated the peer.</summary>
    int ProofLength { get; }

    /// <summary>Computes the proof over the hello transcript for one role.</summary>
    void ComputeProof(ReadOnlySpan<byte> role, ReadOnlySpan<byte> transcript, Span<byte> proof);
}

/// <summary>
/// Pre-shared key: HMAC-SHA256 challenge-response inside the hello. Each side sends a fresh
/// 32-byte nonce; the receiver proves knowledge of the key over (hello, its reply), the sender
/// over (hello, reply) with a different role label, so neither proof can be replayed. It
/// authenticates the peers; it does not encrypt or protect the data that follows (use TLS for that).
/// </summary>
public sealed class PskPeerAuthenticator : IPeerAuthenticator
{
    private readonly byte[] _key;

    public PskPeerAuthenticator(ReadOnlySpan<byte> key)
    {
        if (key.Length < 16) throw new ArgumentException("pre-shared key must be at least 16 bytes");
        _key = key.ToArray();
    }

    /// <summary>Reads a key file (its bytes, with a trailing newline trimmed).</summary>
    public static PskPeerAuthenticator FromFile(string path)
    {
        var bytes = File.ReadAllBytes(path).AsSpan();
        while (bytes.Length > 0 && bytes[^1] is (byte)'\n' or (byte)'\r') bytes = bytes[..^1];
        return new PskPeerAuthenticator(bytes);
    }

    public ValueTask<Stream> SecureAsync(Stream transport, bool isInitiator, string peerName, CancellationToken ct) => ValueTask.FromResult(transport);

    public int ProofLength => 32;

    public void ComputeProof(ReadOnlySpan<byte> role, ReadOnlySpan<byte> transcript, Span<byte> proof)
    {
        using var h = IncrementalHash.CreateHMAC(HashAlgorithmName.SHA256, _key);
        h.AppendData(role);
        h.AppendData(transcript);
        h.GetHashAndReset(proof);
    }
}

/// <summary>No authentication (tests and trusted unix sockets only).</summary>
public sealed class NoPeerAuthenticator : IPeerAuthenticator
{
    public static readonly NoPeerAuthenticator Instance = new();
    public ValueTask<Stream> SecureAsync(Stream transport, bool isInitiator, string peerName, CancellationToken ct) => ValueTask.FromResult(transport);
    public int ProofLength => 0;
    public void ComputeProof(ReadOnlySpan<byte> role, ReadOnlySpan<byte> transcript, Span<byte> proof) { }
}

/// <summary>
/// Mutual TLS with X.509 host certificates (libvirt's <c>/etc/pki/libvirt/</c> and
/// <c>/etc/pki/CA/cacert.pem</c>): both sides present a certificate chained to the CA.
/// </summary>
public sealed class TlsPeerAuthenticator : IPeerAuthenticator
{
    private readonly X509Certificate2 _certificate;
    private readonly X509Certificate2Collection _trust;

    public TlsPeerAuthenticator(X509Certificate2 certificate, X509Certificate2Collection trustedCa)
    {
        _certificate = certificate;
        _trust = trustedCa;
    }

    /// <summary>Loads PEM files: certificate, its key and the CA certificate(s).</summary>
    public static TlsPeerAuthenticator FromPemFiles(string certPath, string keyPath, string caPath)
    {
        var cert = X509Certificate2.CreateFromPemFile(certPath, keyPath);
        var ca = new X509Certificate2Collection();
        ca.ImportFromPemFile(caPath);
        return new TlsPeerAuthenticator(cert, ca);
    }

    public int ProofLength => 0;

    public void ComputeProof(ReadOnlySpan<byte> role, ReadOnlySpan<byte> transcript, Span<byte> proof) { }

    public async ValueTask<Stream> SecureAsync(Stream transport, bool isInitiator, string peerName, CancellationToken ct)
    {
        var ssl = new SslStream(transport, leaveInnerStreamOpen: false, Validate);
        try
        {
            if (isInitiator)
            {
                await ssl.AuthenticateAsClientAsync(new SslClientAuthenticationOptions
                {
                    TargetHost = peerName,
                    ClientCertificates = [_certificate],
                    EnabledSslProtocols = SslProtocols.Tls12 | SslProtocols.Tls13,
                }, ct);
            }
            else
            {
                await ssl.AuthenticateAsServerAsync(new SslServerAuthenticationOptions
                {
                    ServerCertificate = _certificate,
                    ClientCertificateRequired = true,
                    EnabledSslProtocols = SslProtocols.Tls12 | SslProtocols.Tls13,
                }, ct);
            }
        }
        catch (AuthenticationException e)
        {
            await ssl.DisposeAsync();
            throw new PeerAuthenticationException($"TLS with {peerName} failed: {e.Message}", e);
        }
        return ssl;
    }

    private bool Validate(object sender, X509Certificate? certificate, X509Chain? chain, SslPolicyErrors errors)
    {
        if (certificate is null) return false;
        using var custom = new X509Chain();
        custom.ChainPolicy.TrustMode = X509ChainTrustMode.CustomRootTrust;
        custom.ChainPolicy.CustomTrustStore.AddRange(_trust);
        custom.ChainPolicy.RevocationMode = X509RevocationMode.NoCheck;
        using var leaf = new X509Certificate2(certificate);
        // Name mismatches are accepted: the daemon pins peers by CA, as libvirt does with its own host certificates.
        return custom.Build(leaf);
    }
}
