using System.Net.Security;
using System.Security.Authentication;
using System.Security.Cryptography;
using System.Security.Cryptography.X509Certificates;
using BFMig.Native.Linux;

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

    /// <summary>
    /// True when the hello travels inside the secured transport, so the sender must first send a
    /// <see cref="RouteRequest"/> in clear for the receiving daemon to route the connection.
    /// </summary>
    bool HidesHello => false;

    /// <summary>
    /// Keys that seal every frame after the handshake (<see cref="FrameSealer"/>), derived from
    /// the hello transcript; null when the transport already protects the frames (TLS) or nothing
    /// does (unix sockets, tests).
    /// </summary>
    FrameKeys? DeriveFrameKeys(ReadOnlySpan<byte> transcript) => null;
}

/// <summary>
/// Pre-shared key: HMAC-SHA256 challenge-response inside the hello. Each side sends a fresh
/// 32-byte nonce; the receiver proves knowledge of the key over (hello, its reply), the sender
/// over (hello, reply) with a different role label, so neither proof can be replayed. Everything
/// after the handshake (guest memory, disk writes, control frames, both ways) is sealed with
/// AES-256-GCM under per-direction keys derived from the key and the transcript
/// (<see cref="FrameKeys.Derive"/>): an on-path attacker can neither read nor alter, inject,
/// replay or reorder it. The hello and its reply travel in clear (authenticated by the proofs):
/// they hold no guest data, and nothing in them lets a guest forge page or block identity.
/// </summary>
public sealed class PskPeerAuthenticator : IPeerAuthenticator
{
    /// <summary>The fewest random bytes a key holds: 32, as bfmig.conf(5) says (raw, or written as hex or base64).</summary>
    public const int MinKeyLength = 32;

    // Whoever records one handshake can test guesses offline (the proofs are HMAC-SHA256 over
    // nonces sent in clear), so a key must be random bytes, and a password, however long or
    // however written, is refused. What is judged is the bytes a hex or base64 key stands for (or
    // a binary key's own): no text (32 random bytes are valid UTF-8 about once in 10^9), and the
    // spread of the first 32 (their count times the entropy of their frequencies) above that of
    // any pattern of 16 bytes repeated (128 bits); 32 random bytes score 138 or more (200,000
    // drawn). A phrase in base64's letters decodes to bytes that look random, so base64 text must
    // itself spread like random base64: 4.2 bits a character or more for 32 random bytes, 2.7-3.5
    // for a phrase repeated to length.
    private const double MinSpreadOfFirst32 = 130;
    private const double MinBase64BitsPerCharacter = 4.0;

    // A key file larger than this is not a key (and is not read).
    private const int MaxKeyFileLength = 4096;

    private const string HowToMakeOne = "make one with `(umask 077; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n' > FILE)`, the same file on every host";

    private readonly byte[] _key;

    /// <summary>A key from a key file's content (see <see cref="KeyProblem"/>); throws <see cref="ArgumentException"/> for one that is no key.</summary>
    public PskPeerAuthenticator(ReadOnlySpan<byte> content)
    {
        if (KeyProblem(content) is { } weak)
            throw new ArgumentException($"pre-shared key: {weak}");
        _key = KeyBytes(content).ToArray();
    }

    /// <summary>
    /// Reads a key file. Refuses, with a <see cref="PeerAuthenticationException"/> saying how to
    /// fix it, anything but a regular file this user owns that group and others may not read or
    /// write (whoever reads the key can pose as any peer), and a key that is no random key
    /// (<see cref="KeyProblem"/>). The file is judged as it was opened, never by its path again.
    /// </summary>
    public static PskPeerAuthenticator FromFile(string path)
    {
        var (content, problem) = ReadKeyFile(path);
        return problem is null ? new PskPeerAuthenticator(content) : throw new PeerAuthenticationException(problem);
    }

    /// <summary>
    /// Why the key file cannot be used (what it is, its owner, its mode, its key), null when it
    /// can: the one rule bfmigd checks at start, `bfmig doctor` reports and every helper applies.
    /// </summary>
    public static string? KeyFileProblem(string path) => ReadKeyFile(path).Problem;

    /// <summary>
    /// Why a key file's content is no key, null when it is one. Text (printable ASCII and
    /// whitespace) must be hex, or base64 (either alphabet, padded or not) that spreads like
    /// random base64; anything else is the key's bytes themselves. The bytes so meant must be at
    /// least <see cref="MinKeyLength"/>, no text, and spread like random bytes.
    /// </summary>
    public static string? KeyProblem(ReadOnlySpan<byte> content)
    {
        ReadOnlySpan<byte> key = KeyBytes(content);
        byte[] judged;
        string what;
        if (IsText(key))
        {
            string text = string.Concat(System.Text.Encoding.ASCII.GetString(key).Where(c => !char.IsWhiteSpace(c)));
            if (text.Length % 2 == 0 && text.Length > 0 && text.All(char.IsAsciiHexDigit))
            {
                (judged, what) = (Convert.FromHexString(text), $"its {text.Length} hex digits stand for");
            }
            else if (Base64(text) is { } decoded)
            {
                double perCharacter = Spread(System.Text.Encoding.ASCII.GetBytes(text)) / text.Length;
                if (perCharacter < MinBase64BitsPerCharacter)
                    return $"it reads as a phrase in base64's letters ({perCharacter:F1} bits a character, where base64 of random bytes has {MinBase64BitsPerCharacter:F1} or more), and a password is no key; {HowToMakeOne}";
                (judged, what) = (decoded, $"its {text.Length} base64 characters stand for");
            }
            else
            {
                return $"it is text, neither hex nor base64, and a password is no key; {HowToMakeOne}";
            }
        }
        else
        {
            (judged, what) = (content.ToArray(), "it holds");
        }
        if (judged.Length < MinKeyLength)
            return $"{what} {judged.Length} bytes, where a key is at least {MinKeyLength} random bytes; {HowToMakeOne}";
        if (System.Text.Unicode.Utf8.IsValid(judged))
            return $"{what} {judged.Length} bytes of text, and a password, however written, is no key; {HowToMakeOne}";
        double bits = Spread(judged.AsSpan(0, MinKeyLength));
        return bits >= MinSpreadOfFirst32 ? null
            : $"{what} {judged.Length} bytes that repeat too much to be random (the first {MinKeyLength} spread over about {bits:F0} bits, at least {MinSpreadOfFirst32:F0} needed); {HowToMakeOne}";
    }

    // The key's bytes: the content without a trailing newline (what every version has used).
    private static ReadOnlySpan<byte> KeyBytes(ReadOnlySpan<byte> content)
    {
        while (content.Length > 0 && content[^1] is (byte)'\n' or (byte)'\r')
            content = content[..^1];
        return content;
    }

    // Printable ASCII and whitespace only: a key written out (hex, base64, or a password).
    private static bool IsText(ReadOnlySpan<byte> key)
    {
        if (key.IsEmpty)
            return false;
        foreach (byte b in key)
        {
            if (b is not ((>= 0x20 and <= 0x7e) or (byte)'\t' or (byte)'\n' or (byte)'\r'))
                return false;
        }
        return true;
    }

    // Base64 in either alphabet (+/ or -_), padded or not; null when it is not.
    private static byte[]? Base64(string text)
    {
        if (text.Length == 0 || text.Any(c => !(char.IsAsciiLetterOrDigit(c) || c is '+' or '/' or '-' or '_' or '=')))
            return null;
        string standard = text.Replace('-', '+').Replace('_', '/');
        standard = standard.TrimEnd('=');
        if (standard.Length % 4 == 1)
            return null;
        standard = standard.PadRight(standard.Length + (4 - standard.Length % 4) % 4, '=');
        var bytes = new byte[standard.Length];
        return Convert.TryFromBase64String(standard, bytes, out int n) ? bytes[..n] : null;
    }

    // Count times the entropy of the byte frequencies (bits).
    private static double Spread(ReadOnlySpan<byte> bytes)
    {
        Span<int> counts = stackalloc int[256];
        foreach (byte b in bytes)
            counts[b]++;
        double bits = 0;
        foreach (int n in counts)
        {
            if (n > 0)
                bits -= n * Math.Log2((double)n / bytes.Length);
        }
        return bits;
    }

    private static (byte[] Content, string? Problem) ReadKeyFile(string path)
    {
        OpenedFile file;
        try
        {
            file = OpenedFile.Open(path);
        }
        catch (IOException e)
        {
            return ([], $"pre-shared key: {e.Message}");
        }
        using (file)
        {
            if (!file.IsRegular)
                return ([], $"pre-shared key {path} is not a regular file");
            if (file.Uid != UnixUsers.EffectiveUid)
                return ([], $"pre-shared key {path} belongs to user {file.Uid}, not to this one ({UnixUsers.EffectiveUid}): whoever owns it can change it; run `chown root: {path}`");
            const UnixFileMode groupOrOther = UnixFileMode.GroupRead | UnixFileMode.GroupWrite | UnixFileMode.GroupExecute
                | UnixFileMode.OtherRead | UnixFileMode.OtherWrite | UnixFileMode.OtherExecute;
            if ((file.Permissions & groupOrOther) != 0)
                return ([], $"pre-shared key {path} has mode {Convert.ToString((int)file.Permissions, 8).PadLeft(4, '0')}: group or others may read it; run `chmod 0600 {path}` (a key others can read lets them pose as any peer)");
            if (file.Size > MaxKeyFileLength)
                return ([], $"pre-shared key {path} holds {file.Size} bytes: not a key file (a key is {MinKeyLength} random bytes)");
            byte[] content;
            try
            {
                content = file.ReadAll();
            }
            catch (IOException e)
            {
                return ([], $"pre-shared key {path}: cannot read it: {e.Message}");
            }
            return (content, KeyProblem(content) is { } weak ? $"pre-shared key {path}: {weak}" : null);
        }
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

    public FrameKeys? DeriveFrameKeys(ReadOnlySpan<byte> transcript) => FrameKeys.Derive(_key, transcript);
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
/// <c>/etc/pki/CA/cacert.pem</c>): both sides present a certificate that must chain to the given
/// CA(s) and be valid now; with expected peer names, the peer's certificate must also name one of
/// them (subject alternative name or common name, as libvirt checks its servers): the sender the
/// receiver's name, the receiver the configured peer the sender claims to be. The certificate must
/// be meant for its role (extended key usage serverAuth for a receiver, clientAuth for a sender,
/// when it lists any) and must not be on the CA's revocation list, when one is given. A rejected
/// peer fails with <see cref="PeerAuthenticationException"/> saying why, before any stream data moves.
/// </summary>
public sealed class TlsPeerAuthenticator : IPeerAuthenticator
{
    private readonly X509Certificate2 _certificate;
    private readonly X509Certificate2Collection _trust;
    private readonly string[] _expectedPeerNames;
    private readonly string? _expectedPeerName;
    private readonly RevocationList? _revoked;

    /// <param name="certificate">This host's certificate, with its private key.</param>
    /// <param name="trustedCa">The CA certificate(s) a peer's certificate must chain to.</param>
    /// <param name="expectedPeerName">
    /// Host name(s) or address(es), comma-separated, of which the peer's certificate must name one;
    /// null accepts any certificate of the CA. The first is the TLS server name a sender asks for.
    /// </param>
    /// <param name="revoked">The CA's revocation list, if it has one.</param>
    public TlsPeerAuthenticator(X509Certificate2 certificate, X509Certificate2Collection trustedCa, string? expectedPeerName = null, RevocationList? revoked = null)
    {
        if (!certificate.HasPrivateKey) throw new ArgumentException("the certificate has no private key", nameof(certificate));
        _certificate = certificate;
        _trust = trustedCa;
        _expectedPeerNames = expectedPeerName?.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries) ?? [];
        _expectedPeerName = _expectedPeerNames.Length > 0 ? _expectedPeerNames[0] : null;
        _revoked = revoked;
    }

    /// <summary>
    /// Loads PEM files: certificate, its key and the CA certificate(s). Throws
    /// <see cref="PeerAuthenticationException"/> naming the file that cannot be used.
    /// </summary>
    public static TlsPeerAuthenticator FromPemFiles(string certPath, string keyPath, string caPath, string? expectedPeerName = null, string? crlPath = null)
    {
        X509Certificate2 cert;
        try
        {
            cert = X509Certificate2.CreateFromPemFile(certPath, keyPath);
        }
        catch (Exception e) when (e is CryptographicException or IOException or UnauthorizedAccessException or ArgumentException)
        {
            throw new PeerAuthenticationException($"cannot load TLS certificate {certPath} with key {keyPath}: {e.Message}", e);
        }
        var ca = new X509Certificate2Collection();
        try
        {
            ca.ImportFromPemFile(caPath);
        }
        catch (Exception e) when (e is CryptographicException or IOException or UnauthorizedAccessException)
        {
            throw new PeerAuthenticationException($"cannot load TLS CA certificate {caPath}: {e.Message}", e);
        }
        if (ca.Count == 0) throw new PeerAuthenticationException($"TLS CA file {caPath} holds no certificate");
        var revoked = crlPath is null ? null : RevocationList.Load(crlPath, ca);
        return new TlsPeerAuthenticator(cert, ca, expectedPeerName, revoked);
    }

    public int ProofLength => 0;

    public bool HidesHello => true;

    public void ComputeProof(ReadOnlySpan<byte> role, ReadOnlySpan<byte> transcript, Span<byte> proof) { }

    public async ValueTask<Stream> SecureAsync(Stream transport, bool isInitiator, string peerName, CancellationToken ct)
    {
        string? rejection = null;
        bool Validate(object sender, X509Certificate? certificate, X509Chain? chain, SslPolicyErrors errors)
        {
            rejection = Check(certificate, isInitiator);
            return rejection is null;
        }
        var ssl = new SslStream(transport, leaveInnerStreamOpen: false, Validate);
        string who = isInitiator ? $"receiver {_expectedPeerName ?? peerName}" : $"sender{(_expectedPeerName is null ? "" : " " + _expectedPeerName)}";
        try
        {
            // Our own chain is sent whole only if the CA is in it: libvirt's host certificates are leaf-only files.
            var context = SslStreamCertificateContext.Create(_certificate, _trust, offline: true);
            if (isInitiator)
            {
                await ssl.AuthenticateAsClientAsync(new SslClientAuthenticationOptions
                {
                    TargetHost = _expectedPeerName ?? peerName,
                    ClientCertificateContext = context,
                    EnabledSslProtocols = SslProtocols.Tls12 | SslProtocols.Tls13,
                }, ct);
            }
            else
            {
                await ssl.AuthenticateAsServerAsync(new SslServerAuthenticationOptions
                {
                    ServerCertificateContext = context,
                    ClientCertificateRequired = true,
                    EnabledSslProtocols = SslProtocols.Tls12 | SslProtocols.Tls13,
                }, ct);
            }
            if (ssl.RemoteCertificate is null)
                throw new AuthenticationException("the peer presented no certificate");
        }
        catch (Exception e) when (e is AuthenticationException or IOException)
        {
            await ssl.DisposeAsync();
            throw new PeerAuthenticationException($"TLS with {who} failed: {rejection ?? e.Message}", e);
        }
        return ssl;
    }

    // Null when the peer's certificate is acceptable, else why not. The initiator checks a server's certificate, the other side a client's.
    private string? Check(X509Certificate? certificate, bool isInitiator)
    {
        if (certificate is null) return "the peer presented no certificate";
        using var custom = new X509Chain();
        custom.ChainPolicy.TrustMode = X509ChainTrustMode.CustomRootTrust;
        custom.ChainPolicy.CustomTrustStore.AddRange(_trust);
        custom.ChainPolicy.RevocationMode = X509RevocationMode.NoCheck;
        // Extended key usage: a certificate that lists usages must list the one of its role (one without the extension may serve both, as in libvirt).
        custom.ChainPolicy.ApplicationPolicy.Add(new Oid(isInitiator ? "1.3.6.1.5.5.7.3.1" : "1.3.6.1.5.5.7.3.2"));
        using var leaf = X509CertificateLoader.LoadCertificate(certificate.GetRawCertData());
        if (!custom.Build(leaf))
        {
            var status = string.Join(", ", custom.ChainStatus.Select(s => s.StatusInformation.Trim()).Where(s => s.Length > 0).Distinct());
            return $"certificate '{leaf.Subject}' (valid {leaf.NotBefore.ToUniversalTime():yyyy-MM-dd HH:mm} to {leaf.NotAfter.ToUniversalTime():yyyy-MM-dd HH:mm} UTC) " +
                $"is not trusted by the CA file: {(status.Length > 0 ? status : "no valid chain")}";
        }
        if (_expectedPeerNames.Length > 0 && !_expectedPeerNames.Any(n => leaf.MatchesHostname(n, allowWildcards: true, allowCommonName: true)))
            return $"certificate '{leaf.Subject}' names none of {string.Join(", ", _expectedPeerNames)} (the {(isInitiator ? "receiver" : "configured peer the sender claims to be")})";
        if (_revoked is not null && _revoked.IsRevoked(leaf))
            return $"certificate '{leaf.Subject}' (serial {leaf.SerialNumber}) is revoked by the CA's revocation list";
        return null;
    }
}
