namespace BFMig.Cli.Tests;

/// <summary>The fake serves what the contract declares, so the CLI is tested against the real API shape.</summary>
public sealed class ContractTests(PrivateBus bus) : CliTestBase(bus)
{
    [Fact]
    public void Contract_has_every_member_the_cli_uses_with_the_expected_arguments()
    {
        var c = Daemon.Contract;
        Assert.Equal(("", "a{sv}"), (c["GetStatus"].InSignature, c["GetStatus"].OutSignature));
        Assert.Contains(c["ListGuests"].OutSignature, new[] { "a(sssstttx)", "a(ssssttx)" });
        Assert.Equal(("", "a(sssbssx)"), (c["ListTrips"].InSignature, c["ListTrips"].OutSignature));
        Assert.Equal(("", "a(sttttx)s"), (c["ListStoreCosts"].InSignature, c["ListStoreCosts"].OutSignature));
        Assert.Equal(("s", ""), (c["Forget"].InSignature, c["Forget"].OutSignature));
        Assert.Equal(("ss", "tttts"), (c["Estimate"].InSignature, c["Estimate"].OutSignature));
        Assert.Equal(["disk_bytes", "memory_bytes", "stock_disk_bytes", "stock_memory_bytes", "basis"], c["Estimate"].OutNames);
        Assert.Equal(("ss", "sss"), (c["PrepareMigration"].InSignature, c["PrepareMigration"].OutSignature));
        Assert.Equal(["destination_uri", "migrate_uri", "disks_uri"], c["PrepareMigration"].OutNames);
        Assert.Equal(("", "a(sbs)"), (c["Doctor"].InSignature, c["Doctor"].OutSignature));
        Assert.Equal("ssstt", c["TransferProgress"].OutSignature);
        Assert.Equal(["guest", "peer", "stream", "bytes_sent", "bytes_saved"], c["TransferProgress"].OutNames);
        Assert.Equal("ssbs", c["TransferFinished"].OutSignature);
    }

    [Fact]
    public void Fake_introspects_like_the_contract()
    {
        var start = new System.Diagnostics.ProcessStartInfo("busctl",
            [$"--address={Bus.Address}", "introspect", "--xml-interface", FakeDaemon.BusName, FakeDaemon.ObjectPath])
        { RedirectStandardOutput = true, RedirectStandardError = true };
        using var process = System.Diagnostics.Process.Start(start)!;
        string xml = process.StandardOutput.ReadToEnd();
        Assert.True(process.WaitForExit(10000));
        Assert.Equal(0, process.ExitCode);
        var live = System.Xml.Linq.XDocument.Parse(xml).Descendants("interface").Single(i => (string?)i.Attribute("name") == FakeDaemon.Interface);
        foreach (ContractMethod member in Daemon.Contract.Values)
        {
            var element = live.Elements(member.IsSignal ? "signal" : "method").Single(m => (string?)m.Attribute("name") == member.Name);
            string[] types = [.. element.Elements("arg").Select(a => (string)a.Attribute("type")!)];
            Assert.Equal(member.InSignature + member.OutSignature, string.Concat(types));
        }
    }
}
