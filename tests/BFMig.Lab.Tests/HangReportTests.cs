using System.Diagnostics;
using Xunit;

namespace BFMig.Lab.Tests;

/// <summary>The hang report names the processes a hung lab command waits on (no lab needed).</summary>
public sealed class HangReportTests
{
    [Fact]
    public void NamesTheLeavesUnderAHungCommand_WithTheLastOutput()
    {
        using var shell = Process.Start(new ProcessStartInfo("bash", ["-c", "sleep 61 & (sleep 62; true) & setsid sleep 63 & wait"])
        {
            UseShellExecute = false,
        })!;
        try
        {
            // Until both children have become sleep (just after the fork each is a bash leaf), or 10 s.
            string[] expected = ["sleep 61", "sleep 62", "sleep 63"];
            HangReport.Stuck[] stuck = [];
            for (var i = 0; i < 500 && !stuck.Select(s => s.CommandLine).Order().SequenceEqual(expected[..2]); i++)
            {
                Thread.Sleep(20);
                stuck = [.. HangReport.StillRunning(shell.Id)];
            }

            // sleep 63 runs in a session of its own (a lab service started with setsid): left out.
            Assert.Equal(expected[..2], stuck.Select(s => s.CommandLine).Order());
            Assert.All(stuck, s => Assert.InRange(s.Seconds, 0, 30));
            var text = HangReport.Describe("one\ntwo\nthree\nfour\nfive\n", stuck);
            Assert.DoesNotContain("one", text, StringComparison.Ordinal);
            Assert.Contains("  five\nstill running (2 leaf processes", text, StringComparison.Ordinal);
            Assert.Contains("s] sleep 62", text, StringComparison.Ordinal);
        }
        finally
        {
            shell.Kill(entireProcessTree: true);
            shell.WaitForExit();
        }
    }
}
