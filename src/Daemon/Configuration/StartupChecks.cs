using System.Net;
using BFMig.Contracts;

namespace BFMig.Daemon.Configuration;

/// <summary>What bfmigd checks and resolves from its options before it starts anything.</summary>
public static class StartupChecks
{
    /// <summary>
    /// With auth:mode = tls, the first certificate or key file that is missing (the daemon then
    /// runs without a data path: state, guard and CLI keep working, migrations are refused).
    /// </summary>
    public static string? MissingTlsFile(DaemonOptions options)
    {
        if (options.AuthMode != PeerAuthMode.Tls)
            return null;
        foreach (var (key, file) in new[]
        {
            ("auth:tls_cert", options.TlsCertificate), ("auth:tls_key", options.TlsKey), ("auth:tls_ca", options.TlsCaCertificate),
            ("auth:tls_client_cert", options.TlsClientCertificate), ("auth:tls_client_key", options.TlsClientKey),
        })
        {
            if (!File.Exists(file))
                return $"{key} = '{file}' does not exist (auth:mode = tls uses libvirt's host certificates; or set auth:mode = psk)";
        }
        return null;
    }

    /// <summary>The helper to run: transfer:helper, else the installed one, else bfmig-transfer next to this program.</summary>
    public static string LocateHelper(DaemonOptions options)
    {
        if (options.TransferHelper is { } configured)
        {
            return File.Exists(configured) ? configured
                : throw new ConfigurationException($"transfer:helper = '{configured}': no such file");
        }
        if (File.Exists(DefaultPaths.TransferHelper))
            return DefaultPaths.TransferHelper;
        var beside = Path.Combine(AppContext.BaseDirectory, "bfmig-transfer");
        return File.Exists(beside) ? beside
            : throw new ConfigurationException($"transfer:helper is not set and neither {DefaultPaths.TransferHelper} nor {beside} exists");
    }

    public static IPEndPoint ListenEndPoint(DaemonOptions options)
    {
        if (IPAddress.TryParse(options.ListenAddress, out var ip))
            return new IPEndPoint(ip, options.ListenPort);
        var addresses = Dns.GetHostAddresses(options.ListenAddress);
        return addresses.Length > 0 ? new IPEndPoint(addresses[0], options.ListenPort)
            : throw new ConfigurationException($"daemon:listen = '{options.ListenAddress}': the name has no address");
    }
}
