using BFMig.Cli;

namespace BFMig.Cli.Tests;

/// <summary>The text-output helpers, in process.</summary>
public sealed class FormatTests
{
    [Theory]
    [InlineData(0UL, "0 B")]
    [InlineData(1023UL, "1023 B")]
    [InlineData(1024UL, "1.0 KiB")]
    [InlineData(1536UL, "1.5 KiB")]
    [InlineData(12UL << 20, "12.0 MiB")]
    [InlineData((1UL << 30) - (1UL << 10), "1.0 GiB")]
    [InlineData(22UL << 30, "22.0 GiB")]
    [InlineData(ulong.MaxValue, "16.0 EiB")]
    public void Bytes_are_binary_units_with_one_decimal(ulong bytes, string expected) => Assert.Equal(expected, Format.Bytes(bytes));

    [Theory]
    [InlineData(0UL, "0s")]
    [InlineData(59UL, "59s")]
    [InlineData(61UL, "1m 1s")]
    [InlineData(3725UL, "1h 2m 5s")]
    [InlineData(90061UL, "1d 1h 1m")]
    public void Durations(ulong seconds, string expected) => Assert.Equal(expected, Format.Duration(seconds));

    [Fact]
    public void Percent_of_nothing_is_a_dash() => Assert.Equal("-", Format.Percent(0, 0));

    [Fact]
    public void Shell_words_are_quoted_only_when_needed()
    {
        Assert.Equal("virsh migrate vm1 qemu+ssh://h/system", Format.ShellCommand(["virsh", "migrate", "vm1", "qemu+ssh://h/system"]));
        Assert.Equal("a '' 'b c' 'it'\\''s' '$HOME'", Format.ShellCommand(["a", "", "b c", "it's", "$HOME"]));
    }

    [Fact]
    public void Progress_line_bar_splits_sent_from_saved()
    {
        var snapshot = new TransferProgress.Snapshot(
            new Dictionary<string, (ulong, ulong)> { ["memory"] = (1UL << 30, 1UL << 30) }, null, null);
        Assert.Equal("[###############===============] sent 1.0 GiB, saved 1.0 GiB (50.0% saved) | memory 1.0 GiB/1.0 GiB (sent/saved)",
            ProgressDisplay.Line(snapshot));
    }

    [Fact]
    public void Unix_time_is_utc_and_unknown_is_a_dash()
    {
        Assert.Equal("2026-11-23 12:00:00 UTC", Format.UnixTime(1795435200));
        Assert.Equal("-", Format.UnixTime(0));
        Assert.Null(Format.UnixTimeIso(-1));
    }
}
