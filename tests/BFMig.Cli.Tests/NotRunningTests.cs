namespace BFMig.Cli.Tests;

/// <summary>A bus without bfmigd on it: every daemon command says so and exits 1.</summary>
[Collection(BusCollection.Name)]
public sealed class NotRunningTests(PrivateBus bus)
{
    [Theory]
    [InlineData("status")]
    [InlineData("list")]
    [InlineData("estimate", "vm1", "hostB")]
    [InlineData("migrate", "vm1", "hostB")]
    [InlineData("migrate", "vm1", "hostB", "--dry-run")]
    [InlineData("forget", "vm1")]
    public void System_bus_without_daemon_says_how_to_start_it(params string[] args)
    {
        // Tmds.DBus.Protocol takes the "system bus" from DBUS_SYSTEM_BUS_ADDRESS: point it at the private bus.
        CliResult result = CliRunner.Run(args, new Dictionary<string, string> { ["DBUS_SYSTEM_BUS_ADDRESS"] = bus.Address });
        Assert.Equal(1, result.ExitCode);
        Assert.Equal("", result.Stdout);
        Assert.Equal("bfmig: bfmigd is not running on the system bus (org.bfmig.BFMig1): start it with `systemctl start bfmigd`\n", result.Stderr);
    }

    [Fact]
    public void Bus_address_from_option_or_environment_names_that_bus()
    {
        CliResult byOption = CliRunner.Run(["--bus-address", bus.Address, "status"]);
        CliResult byEnvironment = CliRunner.Run(["status"], new Dictionary<string, string> { ["BFMIG_BUS_ADDRESS"] = bus.Address });
        foreach (CliResult result in new[] { byOption, byEnvironment })
        {
            Assert.Equal(1, result.ExitCode);
            Assert.Equal($"bfmig: bfmigd is not running on the bus at {bus.Address} (org.bfmig.BFMig1)\n", result.Stderr);
        }
    }

    [Fact]
    public void Unreachable_bus_is_a_failure_naming_the_address()
    {
        string address = $"unix:path={Path.Combine(bus.Directory.FullName, "no-such-socket")}";
        CliResult result = CliRunner.Run(["list", "--bus-address", address]);
        Assert.Equal(1, result.ExitCode);
        Assert.StartsWith($"bfmig: cannot connect to the bus at {address}: ", result.Stderr, StringComparison.Ordinal);
        Assert.Contains("No such file or directory", result.Stderr, StringComparison.Ordinal);
    }

    [Fact]
    public void Json_failure_prints_no_document()
    {
        CliResult result = CliRunner.Run(["status", "--json", "--bus-address", bus.Address]);
        Assert.Equal(1, result.ExitCode);
        Assert.Equal("", result.Stdout);
        Assert.StartsWith("bfmig: bfmigd is not running", result.Stderr, StringComparison.Ordinal);
    }
}
