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
        req.CertificateExtensions.Add(new X509KeyUsageExtension(X509KeyUsageFlags.KeyCertSign, true));
        return req.CreateSelfSigned(DateTimeOffset.UtcNow.AddDays(-1), DateTimeOffset.UtcNow.AddDays(30));
    }

    private static X509Certificate2 Leaf(X509Certificate2 ca, ECDsa caKey, string host)
    {
        using var key = ECDsa.Create(ECCurve.NamedCurves.nistP256);
        var req = new CertificateRequest($"CN={host}", key, HashAlgorithmName.SHA256);
        req.CertificateExtensions.Add(new X509EnhancedKeyUsageExtension([new Oid("1.3.6.1.5.5.7.3.1"), new Oid("1.3.6.1.5.5.7.3.2")], false));
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
}
