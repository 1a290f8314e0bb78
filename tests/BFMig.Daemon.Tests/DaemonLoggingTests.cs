using BFMig.Daemon.Logging;
using Microsoft.Extensions.Logging;
using Xunit;

namespace BFMig.Daemon.Tests;

public sealed class DaemonLoggingTests
{
    [Fact]
    public void Under_the_journal_each_line_starts_with_its_syslog_priority()
    {
        var output = new StringWriter();
        using (var factory = DaemonLogging.Create("debug", output, underJournal: true))
        {
            var log = factory.CreateLogger("BFMig.Test");
            log.LogInformation("guest {Guest} left for {Peer}", "vm1", "hostb");
            log.LogWarning("peer {Peer} is slow", "hostb");
            log.LogError("transfer failed");
            log.LogDebug("detail");
        }
        var lines = output.ToString().Split('\n', StringSplitOptions.RemoveEmptyEntries);
        Assert.Equal(
            ["<6>BFMig.Test: guest vm1 left for hostb", "<4>BFMig.Test: peer hostb is slow", "<3>BFMig.Test: transfer failed", "<7>BFMig.Test: detail"],
            lines);
    }

    [Fact]
    public void On_a_terminal_lines_carry_time_and_level_and_no_prefix()
    {
        var output = new StringWriter();
        using (var factory = DaemonLogging.Create("info", output, underJournal: false))
            factory.CreateLogger("BFMig.Test").LogInformation("hello");
        var line = output.ToString().TrimEnd();
        Assert.Matches(@"^\d\d:\d\d:\d\d\.\d{3} INF BFMig.Test: hello$", line);
    }

    [Fact]
    public void The_minimum_level_filters()
    {
        var output = new StringWriter();
        using (var factory = DaemonLogging.Create("warning", output, underJournal: true))
        {
            var log = factory.CreateLogger("BFMig.Test");
            log.LogInformation("dropped");
            log.LogWarning("kept");
        }
        Assert.Equal("<4>BFMig.Test: kept", output.ToString().Trim());
    }

    [Fact]
    public void An_unknown_level_is_refused()
    {
        Assert.Throws<ArgumentOutOfRangeException>(() => DaemonLogging.ParseLevel("chatty"));
    }
}
