using BFMig.Daemon.Configuration;
using Xunit;

namespace BFMig.Daemon.Tests;

public sealed class DaemonConfigurationTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("bfmig-conf-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private string WriteConf(string text)
    {
        var path = Path.Combine(_dir, "bfmig.conf");
        File.WriteAllText(path, text);
        return path;
    }

    private static DaemonOptions Load(string? path, string[]? args = null, Dictionary<string, string?>? env = null) =>
        DaemonConfiguration.Load(DaemonConfiguration.Build(path, args ?? [], env ?? []));

    [Fact]
    public void Defaults_apply_when_the_file_is_empty()
    {
        var options = Load(WriteConf("; nothing set\n"));
        Assert.Equal("/var/lib/bfmig", options.StateDirectory);
        Assert.Equal("/run/bfmig", options.RuntimeDirectory);
        Assert.Equal("qemu:///system", options.LibvirtUri);
        Assert.Equal(("0.0.0.0", DaemonConfiguration.DefaultPort), (options.ListenAddress, options.ListenPort));
        Assert.Equal(PeerAuthMode.Tls, options.AuthMode);
        Assert.Equal(CompressionChoice.Auto, options.Compression);
        Assert.Empty(options.Peers);
        Assert.Equal(DaemonConfiguration.DefaultMaxTransfers(Environment.ProcessorCount), options.MaxTransfers);
    }

    [Theory]
    [InlineData(1, 16)]
    [InlineData(2, 16)]
    [InlineData(4, 32)]
    [InlineData(16, 128)]
    [InlineData(96, 128)]
    public void Default_stream_limit_follows_the_cores_and_lets_eight_guests_cross(int cores, int expected)
    {
        Assert.Equal(expected, DaemonConfiguration.DefaultMaxTransfers(cores));
        // Four guests leaving and four arriving, each with memory and one disk: 16 streams on each host.
        Assert.True(DaemonConfiguration.DefaultMaxTransfers(cores) >= 16);
    }

    [Fact]
    public void Reads_sections_and_peers_from_the_ini_file()
    {
        var options = Load(WriteConf("""
            [daemon]
            state_dir = /srv/bfmig
            listen = 198.18.0.1:7000
            [auth]
            mode = psk
            psk_file = /etc/bfmig/psk
            [transfer]
            compression = zstd
            buffer_mib = 8
            [peers:hostb]
            address = 198.18.0.2
            libvirt_uri = qemu+tcp://198.18.0.2/system
            [peers:hostc]
            address = [2001:db8::3]:7001
            """));
        Assert.Equal("/srv/bfmig", options.StateDirectory);
        Assert.Equal(("198.18.0.1", 7000), (options.ListenAddress, options.ListenPort));
        Assert.Equal(PeerAuthMode.Psk, options.AuthMode);
        Assert.Equal("/etc/bfmig/psk", options.PskFile);
        Assert.Equal(CompressionChoice.Zstd, options.Compression);
        Assert.Equal(8, options.BufferMiB);
        Assert.Collection(options.Peers.OrderBy(p => p.Name),
            b => Assert.Equal(new PeerOptions("hostb", "198.18.0.2", DaemonConfiguration.DefaultPort, "qemu+tcp://198.18.0.2/system"), b),
            c => Assert.Equal(new PeerOptions("hostc", "2001:db8::3", 7001, "qemu+tls://2001:db8::3/system"), c));
    }

    [Fact]
    public void Environment_overrides_the_file_and_the_command_line_overrides_both()
    {
        var path = WriteConf("[daemon]\nstate_dir = /from/file\nruntime_dir = /run/file\n");
        var env = new Dictionary<string, string?> { ["BFMIG_DAEMON__STATE_DIR"] = "/from/env", ["BFMIG_DAEMON__RUNTIME_DIR"] = "/run/env" };
        var options = Load(path, ["--state-dir", "/from/cli"], env);
        Assert.Equal("/from/cli", options.StateDirectory);
        Assert.Equal("/run/env", options.RuntimeDirectory);
    }

    [Theory]
    [InlineData("[transfer]\nbuffer_mib = lots\n", "transfer:buffer_mib = 'lots'", "whole number")]
    [InlineData("[transfer]\nbuffer_mib = 0\n", "transfer:buffer_mib = '0'", "from 1 to 256")]
    [InlineData("[transfer]\ncompression = brotli\n", "transfer:compression = 'brotli'", "auto, zstd, lz4, none")]
    [InlineData("[daemon]\nstate_dir = relative/dir\n", "daemon:state_dir = 'relative/dir'", "absolute path")]
    [InlineData("[daemon]\nlisten = 1.2.3.4:99999\n", "daemon:listen = '1.2.3.4:99999'", "port must be")]
    [InlineData("[daemon]\nlog_level = chatty\n", "daemon:log_level = 'chatty'", "one of")]
    [InlineData("[auth]\nmode = psk\n", "auth:mode = psk needs auth:psk_file", "")]
    [InlineData("[peers:hostb]\nlibvirt_uri = qemu+tcp://x/system\n", "peers:hostb:address is required", "")]
    [InlineData("[peers:bad/name]\naddress = x\n", "[peers:bad/name]", "peer name")]
    // Host and peer names are directories under runtime_dir, beside the daemon's and the hook's own.
    [InlineData("[daemon]\nhost_name = incoming\n", "daemon:host_name = 'incoming'", "not be 'incoming'")]
    [InlineData("[daemon]\nhost_name = ..\n", "daemon:host_name = '..'", "start with a letter or digit")]
    [InlineData("[daemon]\nhost_name = .bind\n", "daemon:host_name = '.bind'", "start with a letter or digit")]
    [InlineData("[peers:incoming]\naddress = x\n", "[peers:incoming]", "not be 'incoming'")]
    [InlineData("[peers:.transfers]\naddress = x\n", "[peers:.transfers]", "start with a letter or digit")]
    public void A_bad_value_names_the_key_the_value_and_the_file(string conf, string expectedKey, string expectedWhy)
    {
        var path = WriteConf(conf);
        var e = Assert.Throws<ConfigurationException>(() => Load(path));
        Assert.Contains(expectedKey, e.Message);
        Assert.Contains(expectedWhy, e.Message);
        Assert.Contains(path, e.Message);
    }

    [Fact]
    public void A_bad_value_from_the_environment_names_the_variable()
    {
        var env = new Dictionary<string, string?> { ["BFMIG_TRANSFER__BUFFER_MIB"] = "-3" };
        var e = Assert.Throws<ConfigurationException>(() => Load(WriteConf(""), env: env));
        Assert.Contains("BFMIG_TRANSFER__BUFFER_MIB", e.Message);
    }

    [Fact]
    public void A_bad_value_on_the_command_line_says_so()
    {
        var e = Assert.Throws<ConfigurationException>(() => Load(WriteConf(""), ["--listen", "host:port"]));
        Assert.Contains("on the command line", e.Message);
    }

    [Fact]
    public void A_malformed_line_names_the_file_and_the_line()
    {
        var path = WriteConf("[daemon\nstate_dir = /x\n");
        var e = Assert.Throws<ConfigurationException>(() => Load(path));
        Assert.Contains(path, e.Message);
        Assert.Contains("[daemon", e.Message);
    }

    [Fact]
    public void An_explicit_config_file_that_is_missing_is_an_error()
    {
        var e = Assert.Throws<ConfigurationException>(() => Load(Path.Combine(_dir, "absent.conf")));
        Assert.Contains("absent.conf does not exist", e.Message);
    }

    [Fact]
    public void The_shipped_example_file_parses_and_only_documents_defaults()
    {
        var repo = AppContext.BaseDirectory;
        while (!File.Exists(Path.Combine(repo, "BFMig.sln")))
            repo = Path.GetDirectoryName(repo) ?? throw new InvalidOperationException("repository root not found");
        var shipped = Load(Path.Combine(repo, "packaging", "common", "bfmig.conf"));
        var defaults = Load(WriteConf(""));
        Assert.Equal(defaults with { Peers = [] }, shipped with { Peers = [] });
        Assert.Empty(shipped.Peers);
    }
}
