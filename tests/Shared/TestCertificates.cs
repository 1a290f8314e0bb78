using System.Diagnostics;

namespace BFMig.Tests.Shared;

/// <summary>
/// X.509 files made with the openssl command line at test time, laid out as libvirt keeps them
/// (PEM certificate, PEM key, PEM CA): a CA, host certificates signed by it (with subject
/// alternative names), one signed by another CA, and an expired one.
/// </summary>
internal sealed class TestCertificates : IDisposable
{
    private TestCertificates(string dir) => Directory = dir;

    /// <summary>Where the files are.</summary>
    public string Directory { get; }

    /// <summary>The trusted CA's certificate.</summary>
    public string Ca => Path.Combine(Directory, "ca.pem");

    /// <summary>Another CA nobody trusts.</summary>
    public string OtherCa => Path.Combine(Directory, "otherca.pem");

    /// <summary>True when openssl is on PATH.</summary>
    public static bool Available => File.Exists("/usr/bin/openssl") || File.Exists("/bin/openssl");

    /// <summary>Creates a fresh directory with the two CAs.</summary>
    public static TestCertificates Create()
    {
        var dir = Path.Combine(Path.GetTempPath(), "bfmig-certs-" + Guid.NewGuid().ToString("N")[..12]);
        System.IO.Directory.CreateDirectory(dir);
        var certs = new TestCertificates(dir);
        certs.MakeCa("ca", "BFMig test CA");
        certs.MakeCa("otherca", "Someone else's CA");
        return certs;
    }

    /// <summary>
    /// Issues <c>NAME.pem</c> + <c>NAME.key</c> for common name <paramref name="commonName"/> with the
    /// given DNS names and IP addresses, signed by <paramref name="ca"/> ("ca" or "otherca"),
    /// valid for <paramref name="days"/> days from now (negative: already expired). Returns (cert, key).
    /// </summary>
    public (string Cert, string Key) Issue(string name, string commonName, string[] dnsNames, string[] ips, string ca = "ca", int days = 30)
    {
        string key = Path.Combine(Directory, name + ".key");
        string csr = Path.Combine(Directory, name + ".csr");
        string cert = Path.Combine(Directory, name + ".pem");
        string ext = Path.Combine(Directory, name + ".ext");
        var san = string.Join(",", dnsNames.Select(d => "DNS:" + d).Concat(ips.Select(i => "IP:" + i)));
        File.WriteAllText(ext, $"subjectAltName={san}\nextendedKeyUsage=serverAuth,clientAuth\nkeyUsage=critical,digitalSignature,keyEncipherment\n");
        Run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=" + commonName);
        Run("x509", "-req", "-in", csr, "-CA", Path.Combine(Directory, ca + ".pem"), "-CAkey", Path.Combine(Directory, ca + ".key"),
            "-CAcreateserial", "-out", cert, "-days", days.ToString(System.Globalization.CultureInfo.InvariantCulture), "-extfile", ext);
        return (cert, key);
    }

    private void MakeCa(string name, string commonName) =>
        Run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", Path.Combine(Directory, name + ".key"), "-out", Path.Combine(Directory, name + ".pem"),
            "-subj", "/CN=" + commonName, "-days", "30",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign");

    private static void Run(params string[] args)
    {
        var psi = new ProcessStartInfo("openssl") { RedirectStandardError = true, RedirectStandardOutput = true, UseShellExecute = false };
        foreach (var a in args)
            psi.ArgumentList.Add(a);
        using var p = Process.Start(psi)!;
        var stderr = p.StandardError.ReadToEndAsync();
        p.StandardOutput.ReadToEnd();
        if (!p.WaitForExit(60_000))
        {
            p.Kill();
            throw new TimeoutException("openssl " + string.Join(' ', args) + " did not finish in 60 s");
        }
        if (p.ExitCode != 0)
            throw new InvalidOperationException($"openssl {string.Join(' ', args)} failed ({p.ExitCode}): {stderr.Result}");
    }

    public void Dispose()
    {
        try
        {
            System.IO.Directory.Delete(Directory, recursive: true);
        }
        catch (IOException)
        {
        }
    }
}
