using System.Text;
using BFMig.Daemon.Configuration;

namespace BFMig.Fuzz;

/// <summary>
/// bfmigd's configuration: the input is written as the INI file and read as the daemon reads it
/// (<see cref="DaemonConfiguration.Build"/> then <see cref="DaemonConfiguration.Load"/>, no
/// environment, no command line). Allowed failure: <see cref="ConfigurationException"/>, which
/// must name what was wrong.
/// </summary>
internal static class ConfigTarget
{
    private static readonly string Dir = Path.Combine(Directory.Exists("/dev/shm") ? "/dev/shm" : Path.GetTempPath(), "bfmig-fuzz-conf-" + Environment.ProcessId);

    private static readonly Dictionary<string, string?> NoEnvironment = [];

    public static List<byte[]> Corpus()
    {
        var list = new List<byte[]> { File.ReadAllBytes(Path.Combine(AppContext.BaseDirectory, "Seeds", "bfmig.conf")) };
        foreach (var text in new[]
        {
            """
            [daemon]
            host_name = hosta
            state_dir = /srv/bfmig
            listen = 198.18.0.1:16600
            transparent = no
            admin_group = bfmig-admins
            [auth]
            mode = psk
            psk_file = /etc/bfmig/psk
            [transfer]
            compression = zstd
            buffer_mib = 8
            max_concurrent = 4
            [peers:hostb]
            address = 198.18.0.2
            libvirt_uri = qemu+tcp://198.18.0.2/system
            migration_addresses = 198.18.1.2, 2001:db8::2
            """,
            """
            ; TLS with a peer on IPv6 and every auth path set
            [daemon]
            listen = [::]:16600
            log_level = debug
            transparent_port = 16601
            transparent_silence_ms = 500
            [auth]
            mode = tls
            tls_cert = /etc/pki/libvirt/servercert.pem
            tls_verify_peer_name = yes
            [peers:hostc]
            address = [2001:db8::3]:7001
            """,
            "[daemon]\nlisten = 198.18.0.1\n[peers:b]\naddress=198.18.0.2:1\n",
        })
        {
            list.Add(Encoding.UTF8.GetBytes(text));
        }
        return list;
    }

    public static void Run(byte[] input, Random r)
    {
        Directory.CreateDirectory(Dir);
        string path = Path.Combine(Dir, "bfmig.conf");
        File.WriteAllBytes(path, input);
        var budget = Budget.Start(16 << 20, "config");
        try
        {
            var options = DaemonConfiguration.Load(DaemonConfiguration.Build(path, [], NoEnvironment));
            if (options.ListenPort is < 0 or > 65535 || options.Peers.Any(p => p.Port is < 1 or > 65535))
                throw new InvalidOperationException("a loaded port is out of range");
        }
        catch (ConfigurationException e)
        {
            if (string.IsNullOrWhiteSpace(e.Message))
                throw new InvalidOperationException("a configuration error without a message", e);
        }
        budget.Check(32L * input.Length);
    }

    /// <summary>Removes the scratch directory (end of a mutation run).</summary>
    public static void Close()
    {
        if (Directory.Exists(Dir))
            Directory.Delete(Dir, recursive: true);
    }
}
