using System.Formats.Asn1;
using System.Numerics;
using System.Security.Cryptography;
using System.Security.Cryptography.X509Certificates;

namespace BFMig.Transfer.Wire;

/// <summary>
/// The serial numbers a CA revoked, from a PEM CRL (libvirt's <c>/etc/pki/CA/cacrl.pem</c>).
/// .NET on Linux cannot be handed a CRL for chain building, so the list is read here: its
/// signature must verify with one of the trusted CA certificates, else it is refused (a CRL
/// nobody signed could only be used to unrevoke).
/// </summary>
public sealed class RevocationList
{
    private readonly HashSet<BigInteger> _revoked;

    private RevocationList(X500DistinguishedName issuer, HashSet<BigInteger> revoked)
    {
        Issuer = issuer;
        _revoked = revoked;
    }

    /// <summary>The CA that issued the list.</summary>
    public X500DistinguishedName Issuer { get; }

    /// <summary>How many certificates it revokes.</summary>
    public int Count => _revoked.Count;

    /// <summary>True when <paramref name="certificate"/> was issued by this list's CA and is on it.</summary>
    public bool IsRevoked(X509Certificate2 certificate) =>
        certificate.IssuerName.RawData.AsSpan().SequenceEqual(Issuer.RawData)
        && _revoked.Contains(new BigInteger(certificate.SerialNumberBytes.Span, isUnsigned: true, isBigEndian: true));

    /// <summary>
    /// Reads a PEM (or DER) CRL and checks its signature against <paramref name="trusted"/>.
    /// Throws <see cref="PeerAuthenticationException"/> naming the file and what is wrong.
    /// </summary>
    public static RevocationList Load(string path, X509Certificate2Collection trusted)
    {
        try
        {
            var bytes = File.ReadAllBytes(path);
            var text = System.Text.Encoding.ASCII.GetString(bytes);
            var der = PemEncoding.TryFind(text, out var fields) && text[fields.Label].Equals("X509 CRL", StringComparison.Ordinal)
                ? Convert.FromBase64String(text[fields.Base64Data])
                : bytes;
            return Parse(der, trusted);
        }
        catch (Exception e) when (e is AsnContentException or CryptographicException or FormatException or IOException or UnauthorizedAccessException)
        {
            throw new PeerAuthenticationException($"cannot use the TLS certificate revocation list {path}: {e.Message}", e);
        }
    }

    private static RevocationList Parse(byte[] der, X509Certificate2Collection trusted)
    {
        var outer = new AsnReader(der, AsnEncodingRules.DER).ReadSequence();
        var tbsBytes = outer.ReadEncodedValue();
        var algorithm = outer.ReadSequence().ReadObjectIdentifier();
        var signature = outer.ReadBitString(out _);

        var tbs = new AsnReader(tbsBytes, AsnEncodingRules.DER).ReadSequence();
        if (tbs.PeekTag().HasSameClassAndValue(Asn1Tag.Integer))
            tbs.ReadInteger();
        tbs.ReadSequence();
        var issuer = new X500DistinguishedName(tbs.ReadEncodedValue().Span);
        tbs.ReadEncodedValue(); // thisUpdate
        var revoked = new HashSet<BigInteger>();
        if (tbs.HasData && (tbs.PeekTag().HasSameClassAndValue(Asn1Tag.UtcTime) || tbs.PeekTag().HasSameClassAndValue(Asn1Tag.GeneralizedTime)))
            tbs.ReadEncodedValue(); // nextUpdate
        if (tbs.HasData && tbs.PeekTag().HasSameClassAndValue(Asn1Tag.Sequence))
        {
            var entries = tbs.ReadSequence();
            while (entries.HasData)
            {
                var entry = entries.ReadSequence();
                revoked.Add(new BigInteger(entry.ReadIntegerBytes().Span, isUnsigned: true, isBigEndian: true));
            }
        }
        var signer = trusted.FirstOrDefault(c => c.SubjectName.RawData.AsSpan().SequenceEqual(issuer.RawData))
            ?? throw new CryptographicException($"it was issued by '{issuer.Name}', which is not in the CA file");
        if (!Verify(signer, algorithm, tbsBytes.Span, signature))
            throw new CryptographicException($"its signature does not verify with the CA certificate '{signer.Subject}'");
        return new RevocationList(issuer, revoked);
    }

    private static bool Verify(X509Certificate2 ca, string algorithm, ReadOnlySpan<byte> data, ReadOnlySpan<byte> signature)
    {
        var (hash, rsa) = algorithm switch
        {
            "1.2.840.113549.1.1.11" => (HashAlgorithmName.SHA256, true),
            "1.2.840.113549.1.1.12" => (HashAlgorithmName.SHA384, true),
            "1.2.840.113549.1.1.13" => (HashAlgorithmName.SHA512, true),
            "1.2.840.10045.4.3.2" => (HashAlgorithmName.SHA256, false),
            "1.2.840.10045.4.3.3" => (HashAlgorithmName.SHA384, false),
            "1.2.840.10045.4.3.4" => (HashAlgorithmName.SHA512, false),
            _ => throw new CryptographicException($"its signature algorithm {algorithm} is not supported (use SHA-256 or better with RSA or ECDSA)"),
        };
        if (rsa)
        {
            using var key = ca.GetRSAPublicKey() ?? throw new CryptographicException("the CA has no RSA key");
            return key.VerifyData(data, signature, hash, RSASignaturePadding.Pkcs1);
        }
        using var ec = ca.GetECDsaPublicKey() ?? throw new CryptographicException("the CA has no ECDSA key");
        return ec.VerifyData(data, signature, hash, DSASignatureFormat.Rfc3279DerSequence);
    }
}
