using System.Globalization;
using Microsoft.Extensions.Configuration;
using Microsoft.Extensions.Configuration.CommandLine;
using Microsoft.Extensions.Configuration.Ini;
using Microsoft.Extensions.FileProviders;

namespace BFMig.Daemon.Configuration;

/// <summary>
/// Reads bfmigd's settings from, in rising precedence, the INI file, <c>BFMIG_*</c> environment
/// variables (<c>BFMIG_DAEMON__STATE_DIR</c>) and the command line (<c>--state-dir</c> or
/// <c>--daemon:state_dir=</c>), then validates every value, naming key and source on error.
/// </summary>
public static class DaemonConfiguration
{
    public const string DefaultPath = "/etc/bfmig/bfmig.conf";
    public const string EnvironmentPrefix = "BFMIG_";
    public const int DefaultPort = 16600;

    /// <summary>
    /// A departure snapshot left unchanged this long is evicted unless bfmig.conf says otherwise:
    /// after months away little of it still matches the guest (VeCycle: 20-50 % after a day).
    /// </summary>
    public const int DefaultMaxAgeDays = 90;

    /// <summary>Short command-line switches for the settings an operator overrides most.</summary>
    private static readonly Dictionary<string, string> Switches = new(StringComparer.Ordinal)
    {
        ["--state-dir"] = "daemon:state_dir",
        ["--runtime-dir"] = "daemon:runtime_dir",
        ["--libvirt-uri"] = "daemon:libvirt_uri",
        ["--listen"] = "daemon:listen",
        ["--host-name"] = "daemon:host_name",
        ["--log-level"] = "daemon:log_level",
        ["--bus-address"] = "daemon:bus_address",
    };

    /// <summary>
    /// Builds the layered configuration. <paramref name="configPath"/> null means the default
    /// path, which may be absent; an explicitly named file must exist.
    /// </summary>
    public static IConfigurationRoot Build(string? configPath, IReadOnlyList<string> args, IDictionary<string, string?>? environment = null)
    {
        // Absolute, or the INI provider would look next to the executable instead of the working directory.
        var path = Path.GetFullPath(configPath ?? DefaultPath);
        var builder = new ConfigurationBuilder();
        if (configPath is not null && !File.Exists(path))
            throw new ConfigurationException($"configuration file {path} does not exist");
        builder.AddIniFile(path, optional: true, reloadOnChange: false);
        if (environment is null)
            builder.AddEnvironmentVariables(EnvironmentPrefix);
        else
            builder.AddInMemoryCollection(FromEnvironment(environment));
        builder.AddCommandLine(args.ToArray(), Switches);
        try
        {
            return builder.Build();
        }
        catch (InvalidDataException e)
        {
            throw new ConfigurationException($"{path}: {e.InnerException?.Message ?? e.Message}", e);
        }
        catch (FormatException e)
        {
            throw new ConfigurationException($"command line: {e.Message}", e);
        }
    }

    /// <summary>
    /// Default <c>transfer:max_concurrent</c> on a host with <paramref name="cores"/> cores: 8 per
    /// core, at least 16, at most 128. Every guest in a migration takes one stream for memory and
    /// one per copied disk (plus one per multifd channel), on both hosts; 16 lets 4 guests leave
    /// while 4 others arrive even on a 2-core host. A stream over the limit is not carried (in
    /// transparent mode it goes byte for byte at stock cost), so the default errs high: a helper
    /// mostly waits on the link, and its memory is a few MiB of buffers.
    /// </summary>
    public static int DefaultMaxTransfers(int cores) => Math.Clamp(8 * cores, 16, 128);

    /// <summary>Validates and returns the options; throws <see cref="ConfigurationException"/> on the first bad value.</summary>
    public static DaemonOptions Load(IConfigurationRoot config)
    {
        var s = new SettingReader(config);
        // Port 0 lets the kernel pick one (tests; the real port is in GetStatus's data_port).
        var (listenAddress, listenPort) = s.Endpoint("daemon:listen", "0.0.0.0", DefaultPort, minPort: 0);
        var auth = s.Enum("auth:mode", PeerAuthMode.Tls);
        var pskFile = s.OptionalPath("auth:psk_file");
        if (auth == PeerAuthMode.Psk && pskFile is null)
            throw new ConfigurationException($"auth:mode = psk needs auth:psk_file ({s.Where("auth:mode")})");

        var peers = ReadPeers(config, s);
        return new DaemonOptions
        {
            HostName = s.HostName("daemon:host_name", Environment.MachineName),
            StateDirectory = s.Path("daemon:state_dir", "/var/lib/bfmig"),
            RuntimeDirectory = s.Path("daemon:runtime_dir", "/run/bfmig"),
            LibvirtUri = s.Text("daemon:libvirt_uri", "qemu:///system"),
            ListenAddress = listenAddress,
            ListenPort = listenPort,
            QemuUser = s.Name("daemon:qemu_user", "libvirt-qemu"),
            QemuGroup = s.Name("daemon:qemu_group", "kvm"),
            QemuPidDirectory = s.Path("daemon:qemu_pid_dir", BFMig.Native.Linux.GuestQemu.DefaultPidDirectory),
            LogLevel = s.OneOf("daemon:log_level", "info", "debug", "info", "warning", "error"),
            AuthMode = auth,
            PskFile = pskFile,
            TlsCertificate = s.Path("auth:tls_cert", "/etc/pki/libvirt/servercert.pem"),
            TlsKey = s.Path("auth:tls_key", "/etc/pki/libvirt/private/serverkey.pem"),
            TlsCaCertificate = s.Path("auth:tls_ca", "/etc/pki/CA/cacert.pem"),
            TlsClientCertificate = s.Path("auth:tls_client_cert", "/etc/pki/libvirt/clientcert.pem"),
            TlsClientKey = s.Path("auth:tls_client_key", "/etc/pki/libvirt/private/clientkey.pem"),
            TlsCrl = s.Path("auth:tls_crl", "/etc/pki/CA/cacrl.pem"),
            TlsVerifyPeerName = s.Boolean("auth:tls_verify_peer_name", true),
            Compression = s.Enum("transfer:compression", CompressionChoice.Auto),
            BufferMiB = s.Integer("transfer:buffer_mib", 4, min: 1, max: 256),
            BusAddress = s.OptionalText("daemon:bus_address"),
            AdminGroup = s.OptionalText("daemon:admin_group") is { Length: > 0 } admins ? s.Name("daemon:admin_group", admins) : null,
            HookPath = s.Path("daemon:hook_path", "/etc/libvirt/hooks/qemu.d/50-bfmig"),
            TransferHelper = s.OptionalPath("transfer:helper"),
            MaxTransfers = s.Integer("transfer:max_concurrent", DefaultMaxTransfers(Environment.ProcessorCount), min: 1, max: 256),
            ShutdownGraceSeconds = s.Integer("transfer:shutdown_grace_seconds", 20, min: 0, max: 3600),
            RehashRateMBps = s.Integer("transfer:rehash_mbps", 400, min: 0, max: 100_000),
            Peers = peers,
            Transparent = s.Boolean("daemon:transparent", peers.Count > 0),
            TransparentPort = s.Integer("daemon:transparent_port", 16601, min: 0, max: 65535),
            TransparentSilenceMilliseconds = s.Integer("daemon:transparent_silence_ms", 300, min: 50, max: 10000),
            QemuConf = s.Path("daemon:qemu_conf", "/etc/libvirt/qemu.conf"),
            Retention = new Guests.RetentionLimits(
                MaxTotalBytes: s.Integer("retention:max_total_mib", 0, min: 0, max: int.MaxValue) * 1048576L,
                MaxGuestBytes: s.Integer("retention:max_guest_mib", 0, min: 0, max: int.MaxValue) * 1048576L,
                MaxAge: TimeSpan.FromDays(s.Integer("retention:max_age_days", DefaultMaxAgeDays, min: 0, max: 36500)),
                Interval: TimeSpan.FromMinutes(s.Integer("retention:interval_minutes", 60, min: 1, max: 10080))),
        };
    }

    private static List<PeerOptions> ReadPeers(IConfigurationRoot config, SettingReader s)
    {
        var peers = new List<PeerOptions>();
        foreach (var section in config.GetSection("peers").GetChildren())
        {
            var name = section.Key;
            if (!SettingReader.IsHostName(name))
                throw new ConfigurationException($"[peers:{name}]: a peer name {SettingReader.HostNameRule} ({s.Where($"peers:{name}")})");
            var (host, port) = s.Endpoint($"peers:{name}:address", null, DefaultPort);
            var uri = s.Text($"peers:{name}:libvirt_uri", $"qemu+tls://{host}/system");
            var migration = s.OptionalText($"peers:{name}:migration_addresses") is { } list
                ? list.Split([',', ' '], StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries)
                : [];
            foreach (var address in migration)
            {
                if (!System.Net.IPAddress.TryParse(address, out _))
                    throw new ConfigurationException($"peers:{name}:migration_addresses: '{address}' is not an IP address ({s.Where($"peers:{name}:migration_addresses")})");
            }
            peers.Add(new PeerOptions(name, host, port, uri) { MigrationAddresses = migration });
        }
        return peers;
    }

    private static Dictionary<string, string?> FromEnvironment(IDictionary<string, string?> environment)
    {
        var result = new Dictionary<string, string?>(StringComparer.OrdinalIgnoreCase);
        foreach (var (key, value) in environment)
        {
            if (key.StartsWith(EnvironmentPrefix, StringComparison.OrdinalIgnoreCase))
                result[key[EnvironmentPrefix.Length..].Replace("__", ":", StringComparison.Ordinal)] = value;
        }
        return result;
    }

    /// <summary>Tells, for a key, which source supplied its value, for error messages.</summary>
    internal static string DescribeSource(IConfigurationRoot config, string key)
    {
        // A required key that is absent is best described by where its section was written.
        var parent = key.Contains(':', StringComparison.Ordinal) ? key[..key.LastIndexOf(':')] : null;
        foreach (var provider in config.Providers.Reverse())
        {
            var hasKey = provider.TryGet(key, out _);
            var hasSection = provider.GetChildKeys([], key).Any() || parent is not null && provider.GetChildKeys([], parent).Any();
            if (!hasKey && !hasSection)
                continue;
            var variable = EnvironmentPrefix + key.Replace(":", "__", StringComparison.Ordinal).ToUpperInvariant();
            return provider switch
            {
                IniConfigurationProvider ini => $"in {FullPath(ini.Source)}",
                CommandLineConfigurationProvider => "on the command line",
                _ => $"from environment variable {variable}",
            };
        }
        return "default";
    }

    private static string FullPath(FileConfigurationSource source) =>
        source.FileProvider is PhysicalFileProvider physical && source.Path is not null
            ? System.IO.Path.Combine(physical.Root, source.Path)
            : source.Path ?? "the configuration file";

    /// <summary>Typed reads of single settings, each failing with key, value and source.</summary>
    private sealed class SettingReader(IConfigurationRoot config)
    {
        public string Where(string key) => DescribeSource(config, key);

        public string Text(string key, string fallback)
        {
            var value = config[key];
            if (value is null)
                return fallback;
            if (value.Trim().Length == 0)
                throw Bad(key, value, "must not be empty");
            return value.Trim();
        }

        public string Path(string key, string fallback)
        {
            var value = Text(key, fallback);
            if (!value.StartsWith('/'))
                throw Bad(key, value, "must be an absolute path");
            return value;
        }

        public string? OptionalPath(string key) => config[key] is null ? null : Path(key, "/");

        public string? OptionalText(string key) => config[key] is null ? null : Text(key, "");

        public string Name(string key, string fallback)
        {
            var value = Text(key, fallback);
            if (!IsSimpleName(value))
                throw Bad(key, value, "may use only letters, digits, '-', '_' and '.'");
            return value;
        }

        /// <summary>What <see cref="IsHostName"/> demands, for messages.</summary>
        public const string HostNameRule = "must start with a letter or digit, use only letters, digits, '-', '_' and '.', and not be 'incoming'";

        /// <summary>
        /// A host or peer name: each names a directory under runtime_dir (RUNTIME/NAME, whose
        /// own-host one the QEMU group may write to), beside the daemon's own ".bind" and
        /// ".transfers" and the hook's root-only "incoming" markers; "..", a dot name or
        /// "incoming" would hand one of those to QEMU.
        /// </summary>
        public static bool IsHostName(string value) =>
            IsSimpleName(value) && char.IsAsciiLetterOrDigit(value[0]) && value != "incoming";

        public string HostName(string key, string fallback)
        {
            var value = Text(key, fallback);
            if (!IsHostName(value))
                throw Bad(key, value, HostNameRule);
            return value;
        }

        public string OneOf(string key, string fallback, params string[] allowed)
        {
            var value = Text(key, fallback).ToLowerInvariant();
            if (!allowed.Contains(value))
                throw Bad(key, value, $"must be one of {string.Join(", ", allowed)}");
            return value;
        }

        public T Enum<T>(string key, T fallback) where T : struct, System.Enum
        {
            var raw = config[key];
            if (raw is null)
                return fallback;
            if (System.Enum.TryParse<T>(raw.Trim(), ignoreCase: true, out var value) && System.Enum.IsDefined(value) && !int.TryParse(raw, out _))
                return value;
            var names = string.Join(", ", System.Enum.GetNames<T>().Select(n => n.ToLowerInvariant()));
            throw Bad(key, raw, $"must be one of {names}");
        }

        public bool Boolean(string key, bool fallback)
        {
            var raw = config[key];
            if (raw is null)
                return fallback;
            return raw.Trim().ToLowerInvariant() switch
            {
                "yes" or "true" or "1" or "on" => true,
                "no" or "false" or "0" or "off" => false,
                _ => throw Bad(key, raw, "must be yes or no"),
            };
        }

        public int Integer(string key, int fallback, int min, int max)
        {
            var raw = config[key];
            if (raw is null)
                return fallback;
            if (!int.TryParse(raw.Trim(), NumberStyles.None, CultureInfo.InvariantCulture, out var value) || value < min || value > max)
                throw Bad(key, raw, $"must be a whole number from {min} to {max}");
            return value;
        }

        /// <summary>HOST, HOST:PORT or [IPv6]:PORT.</summary>
        public (string Host, int Port) Endpoint(string key, string? fallbackHost, int fallbackPort, int minPort = 1)
        {
            var raw = config[key];
            if (raw is null)
            {
                if (fallbackHost is null)
                    throw new ConfigurationException($"{key} is required ({Where(key)})");
                return (fallbackHost, fallbackPort);
            }
            var text = raw.Trim();
            string host, portText;
            if (text.StartsWith('['))
            {
                // [IPv6] or [IPv6]:PORT
                var close = text.IndexOf(']');
                var rest = close < 0 ? "?" : text[(close + 1)..];
                if (close < 0 || rest.Length > 0 && !rest.StartsWith(':'))
                    throw Bad(key, raw, "expected [IPV6] or [IPV6]:PORT");
                host = text[1..close];
                portText = rest.TrimStart(':');
            }
            else if (text.Count(c => c == ':') == 1)
            {
                host = text[..text.IndexOf(':')];
                portText = text[(text.IndexOf(':') + 1)..];
            }
            else
            {
                // A name, an IPv4 address or a bare IPv6 address: no port given.
                host = text;
                portText = "";
            }
            var port = fallbackPort;
            if (portText.Length > 0 && (!int.TryParse(portText, NumberStyles.None, CultureInfo.InvariantCulture, out port) || port < minPort || port > 65535))
                throw Bad(key, raw, $"port must be a number from {minPort} to 65535");
            if (host.Length == 0 || host.Any(char.IsWhiteSpace))
                throw Bad(key, raw, "expected HOST or HOST:PORT");
            return (host, port);
        }

        public static bool IsSimpleName(string value) =>
            value.Length is > 0 and <= 64 && value.All(c => char.IsAsciiLetterOrDigit(c) || c is '-' or '_' or '.');

        private ConfigurationException Bad(string key, string value, string why) =>
            new($"{key} = '{value}' {Where(key)}: {why}");
    }
}
