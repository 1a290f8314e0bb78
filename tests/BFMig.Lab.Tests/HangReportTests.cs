using System.Diagnostics;
using Xunit;

namespace BFMig.Lab.Tests;

/// <summary>The hang report names the processes a hung lab command waits on (no lab needed).</summary>
public sealed class HangReportTests
{
    [Fact]
    public void NamesTheLeavesUnderAHungCommand_WithTheLastOutput()
    {
        using var shell = Process.Start(new ProcessStartInfo("bash", ["-c", "sleep 61 & (sleep 62; true) & wait"])
        {
            UseShellExecute = false,
        })!;
        try
        {
            HangReport.Stuck[] stuck = [];
            for (var i = 0; i < 100 && stuck.Length < 2; i++)
            {
                Thread.Sleep(20);
                stuck = [.. HangReport.StillRunning(shell.Id)];
            }

            Assert.Equal(["sleep 61", "sleep 62"], stuck.Select(s => s.CommandLine).Order());
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
