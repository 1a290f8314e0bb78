using System.Text.Json;

namespace BFMig.Cli.Tests;

/// <summary>A fresh fake daemon on the shared private bus for each test.</summary>
[Collection(BusCollection.Name)]
public abstract class CliTestBase : IDisposable
{
    protected CliTestBase(PrivateBus bus)
    {
        Bus = bus;
        Daemon = new FakeDaemon(bus.Address);
    }

    protected PrivateBus Bus { get; }

    protected FakeDaemon Daemon { get; }

    /// <summary>Runs bfmig against the private bus (via --bus-address).</summary>
    protected CliResult Bfmig(params string[] args) => CliRunner.Run(["--bus-address", Bus.Address, .. args]);

    protected CliResult BfmigWith(IReadOnlyDictionary<string, string> environment, params string[] args) =>
        CliRunner.Run(["--bus-address", Bus.Address, .. args], environment);

    protected static JsonElement Json(CliResult result)
    {
        Assert.True(result.ExitCode is 0 or 1, result.ToString());
        using JsonDocument document = JsonDocument.Parse(result.Stdout);
        return document.RootElement.Clone();
    }

    /// <summary>Lines of text output with trailing spaces removed.</summary>
    protected static string[] Lines(string text) => [.. text.Split('\n', StringSplitOptions.RemoveEmptyEntries).Select(l => l.TrimEnd())];

    public virtual void Dispose()
    {
        Daemon.Dispose();
        GC.SuppressFinalize(this);
    }
}
