namespace BFMig.Cli.Tests;

/// <summary>Version, help and usage errors: no bus needed.</summary>
public sealed class UsageTests
{
    [Fact]
    public void Version_prints_the_build_version()
    {
        CliResult result = CliRunner.Run(["--version"]);
        Assert.Equal(0, result.ExitCode);
        Assert.Equal($"bfmig {BFMig.Native.BuildInfo.Version}\n", result.Stdout);
    }

    [Fact]
    public void Help_lists_every_command()
    {
        CliResult result = CliRunner.Run(["--help"]);
        Assert.Equal(0, result.ExitCode);
        foreach (string command in new[] { "status", "list", "estimate", "migrate", "forget", "doctor", "--json", "--bus-address" })
        {
            Assert.Contains(command, result.Stdout, StringComparison.Ordinal);
        }
    }

    [Theory]
    [InlineData(new string[0], "Required command was not provided")]
    [InlineData(new[] { "frobnicate" }, "Unrecognized command or argument 'frobnicate'")]
    [InlineData(new[] { "estimate", "vm1" }, "Required argument missing for command: 'estimate'")]
    [InlineData(new[] { "migrate" }, "Required argument missing for command: 'migrate'")]
    [InlineData(new[] { "forget" }, "Required argument missing for command: 'forget'")]
    [InlineData(new[] { "status", "--frob" }, "Unrecognized command or argument '--frob'")]
    [InlineData(new[] { "list", "extra" }, "Unrecognized command or argument 'extra'")]
    [InlineData(new[] { "status", "--bus-address" }, "Required argument missing for option: '--bus-address'")]
    public void Usage_errors_exit_2_with_one_line(string[] args, string expected)
    {
        CliResult result = CliRunner.Run(args);
        Assert.Equal(2, result.ExitCode);
        Assert.Equal("", result.Stdout);
        Assert.Equal($"bfmig: {expected} (see bfmig --help)\n", result.Stderr);
    }
}
