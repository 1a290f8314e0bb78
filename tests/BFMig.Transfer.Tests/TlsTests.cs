using System.Security.Cryptography;
using System.Security.Cryptography.X509Certificates;
using BFMig.Transfer.Wire;

namespace BFMig.Transfer.Tests;

public class TlsTests
{
    private static X509Certificate2 Ca(string name, out ECDsa key)
    {
        key = ECDsa.Create(ECCurve.NamedCurves.nistP256);
        var req = new CertificateRequest($"CN={name}", key, HashAlgorithmName.SHA256);
        req.CertificateExtensions.Add(new X509BasicConstraintsExtension(true, false, 0, true));
        req.CertificateExtensions.Add(new X509KeyUsageExtension(X509KeyUsageFlags.KeyCertSign | X509KeyUsageFlags.CrlSign, true));
        return req.CreateSelfSigned(DateTimeOffset.UtcNow.AddDays(-1), DateTimeOffset.UtcNow.AddDays(30));
    }

    private static X509Certificate2 Leaf(X509Certificate2 ca, ECDsa caKey, string host, params string[] usages)
    {
        using var key = ECDsa.Create(ECCurve.NamedCurves.nistP256);
        var req = new CertificateRequest($"CN={host}", key, HashAlgorithmName.SHA256);
        var eku = new OidCollection();
        foreach (var usage in usages.Length > 0 ? usages : ["1.3.6.1.5.5.7.3.1", "1.3.6.1.5.5.7.3.2"])
            eku.Add(new Oid(usage));
        req.CertificateExtensions.Add(new X509EnhancedKeyUsageExtension(eku, false));
        var san = new SubjectAlternativeNameBuilder();
        san.AddDnsName(host);
        req.CertificateExtensions.Add(san.Build());
        using var cert = req.Create(ca.SubjectName, X509SignatureGenerator.CreateForECDsa(caKey), DateTimeOffset.UtcNow.AddDays(-1), DateTimeOffset.UtcNow.AddDays(10), RandomNumberGenerator.GetBytes(8));
        using var withKey = cert.CopyWithPrivateKey(key);
        return X509CertificateLoader.LoadPkcs12(withKey.Export(X509ContentType.Pkcs12), null);
    }

    private static async Task<(Exception? Client, Exception? Server)> Connect(TlsPeerAuthenticator client, TlsPeerAuthenticator server)
    {
        var (a, b) = await WireTests.Pair();
        using var sa = new System.Net.Sockets.NetworkStream(a, true);
        using var sb = new System.Net.Sockets.NetworkStream(b, true);
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(20));
        var s = Task.Run(async () =>
        {
            await using var st = await server.SecureAsync(sb, isInitiator: false, "", cts.Token);
            var buf = new byte[5];
            await st.ReadExactlyAsync(buf, cts.Token);
            await st.WriteAsync(buf, cts.Token);
        });
        Exception? ce = null, se = null;
        try
        {
            await using var ct = await client.SecureAsync(sa, isInitiator: true, "hostB", cts.Token);
            await ct.WriteAsync("hello"u8.ToArray(), cts.Token);
            var back = new byte[5];
            await ct.ReadExactlyAsync(back, cts.Token);
            Assert.Equal("hello"u8.ToArray(), back);
        }
        catch (Exception e) { ce = e; a.Dispose(); }
        try { await s; } catch (Exception e) { se = e; }
        return (ce, se);
    }

    [Fact]
    public async Task Mutual_tls_with_certificates_from_one_ca_works_and_a_foreign_ca_is_rejected()
    {
        using var ca = Ca("BFMig test CA", out var caKey);
        using var other = Ca("Someone else", out var otherKey);
        var trust = new X509Certificate2Collection { ca };
        var hostA = new TlsPeerAuthenticator(Leaf(ca, caKey, "hostA"), trust);
        var hostB = new TlsPeerAuthenticator(Leaf(ca, caKey, "hostB"), trust);
        var (c, s) = await Connect(hostA, hostB);
        Assert.Null(c);
        Assert.Null(s);
        Assert.Equal(0, hostA.ProofLength);

        var intruder = new TlsPeerAuthenticator(Leaf(other, otherKey, "hostA"), new X509Certificate2Collection { other });
        var (c2, s2) = await Connect(intruder, hostB);
        Assert.NotNull(c2);
        Assert.NotNull(s2);
        caKey.Dispose();
        otherKey.Dispose();
    }

    private const string ServerAuth = "1.3.6.1.5.5.7.3.1";

    [Fact]
    public async Task The_receiver_accepts_only_a_client_certificate_that_names_the_peer_the_sender_claims_to_be()
    {
        using var ca = Ca("BFMig test CA", out var caKey);
        var trust = new X509Certificate2Collection { ca };
        // The receiver was told (by its daemon, from the route) that hostA connects: hostC's certificate from the same CA is not enough.
        var receiver = new TlsPeerAuthenticator(Leaf(ca, caKey, "hostB"), trust, "198.18.0.1,hostA");
        var (c, s) = await Connect(new TlsPeerAuthenticator(Leaf(ca, caKey, "hostA"), trust), receiver);
        Assert.Null(c);
        Assert.Null(s);
        var (c2, s2) = await Connect(new TlsPeerAuthenticator(Leaf(ca, caKey, "hostC"), trust), receiver);
        Assert.NotNull(c2);
        var rejection = Assert.IsType<PeerAuthenticationException>(s2);
        Assert.Contains("names none of 198.18.0.1, hostA", rejection.Message);
        caKey.Dispose();
    }

    [Fact]
    public async Task A_client_certificate_made_only_for_servers_is_refused_by_its_extended_key_usage()
    {
        using var ca = Ca("BFMig test CA", out var caKey);
        var trust = new X509Certificate2Collection { ca };
        var receiver = new TlsPeerAuthenticator(Leaf(ca, caKey, "hostB"), trust);
        var (c, s) = await Connect(new TlsPeerAuthenticator(Leaf(ca, caKey, "hostA", ServerAuth), trust), receiver);
        Assert.NotNull(c);
        Assert.IsType<PeerAuthenticationException>(s);
        caKey.Dispose();
    }

    [Fact]
    public async Task A_certificate_on_the_CAs_revocation_list_is_refused_and_a_list_not_signed_by_the_CA_is_not_used()
    {
        using var ca = Ca("BFMig test CA", out var caKey);
        using var other = Ca("BFMig test CA", out var otherKey);
        var trust = new X509Certificate2Collection { ca };
        var revokedLeaf = Leaf(ca, caKey, "hostA");
        var crl = new CertificateRevocationListBuilder();
        crl.AddEntry(revokedLeaf, DateTimeOffset.UtcNow.AddMinutes(-5));
        var dir = Directory.CreateTempSubdirectory("bfmig-crl-");
        try
        {
            var crlPath = Path.Combine(dir.FullName, "cacrl.pem");
            File.WriteAllText(crlPath, PemEncoding.WriteString("X509 CRL",
                crl.Build(ca, 1, DateTimeOffset.UtcNow.AddDays(7), HashAlgorithmName.SHA256)));
            var list = RevocationList.Load(crlPath, trust);
            Assert.Equal(1, list.Count);
            var receiver = new TlsPeerAuthenticator(Leaf(ca, caKey, "hostB"), trust, revoked: list);
            var (c, s) = await Connect(new TlsPeerAuthenticator(revokedLeaf, trust), receiver);
            Assert.NotNull(c);
            Assert.Contains("revoked", Assert.IsType<PeerAuthenticationException>(s).Message);
            var (c2, s2) = await Connect(new TlsPeerAuthenticator(Leaf(ca, caKey, "hostA"), trust), receiver);
            Assert.Null(c2);
            Assert.Null(s2);

            // Same issuer name, other key: a forged list is refused, not silently trusted.
            File.WriteAllText(crlPath, PemEncoding.WriteString("X509 CRL",
                new CertificateRevocationListBuilder().Build(other, 1, DateTimeOffset.UtcNow.AddDays(7), HashAlgorithmName.SHA256)));
            Assert.Contains("signature does not verify", Assert.Throws<PeerAuthenticationException>(() => RevocationList.Load(crlPath, trust)).Message);
        }
        finally
        {
            dir.Delete(recursive: true);
            caKey.Dispose();
            otherKey.Dispose();
        }
    }
}
