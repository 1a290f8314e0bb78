using System.Globalization;
using System.Text;

namespace BFMig.Cli;

/// <summary>How numbers, times and commands read in bfmig's text output (culture-invariant).</summary>
internal static class Format
{
    private static readonly string[] Units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];

    /// <summary>1536 -> "1.5 KiB"; below 1 KiB exact bytes.</summary>
    public static string Bytes(ulong bytes)
    {
        if (bytes < 1024)
        {
            return string.Create(CultureInfo.InvariantCulture, $"{bytes} B");
        }
        double value = bytes;
        int unit = 0;
        while (value >= 1024 && unit < Units.Length - 1)
        {
            value /= 1024;
            unit++;
        }
        // 1023.96 MiB would round to "1024.0 MiB": show it as the next unit instead.
        if (Math.Round(value, 1) >= 1024 && unit < Units.Length - 1)
        {
            value /= 1024;
            unit++;
        }
        return string.Create(CultureInfo.InvariantCulture, $"{value:0.0} {Units[unit]}");
    }

    /// <summary>Share of <paramref name="part"/> in <paramref name="whole"/> as "98.8%", "-" when whole is 0.</summary>
    public static string Percent(ulong part, ulong whole) =>
        whole == 0 ? "-" : string.Create(CultureInfo.InvariantCulture, $"{100.0 * part / whole:0.0}%");

    /// <summary>3725 -> "1h 2m 5s".</summary>
    public static string Duration(ulong seconds)
    {
        ulong days = seconds / 86400, hours = seconds / 3600 % 24, minutes = seconds / 60 % 60, rest = seconds % 60;
        return days > 0 ? string.Create(CultureInfo.InvariantCulture, $"{days}d {hours}h {minutes}m")
            : hours > 0 ? string.Create(CultureInfo.InvariantCulture, $"{hours}h {minutes}m {rest}s")
            : minutes > 0 ? string.Create(CultureInfo.InvariantCulture, $"{minutes}m {rest}s")
            : string.Create(CultureInfo.InvariantCulture, $"{rest}s");
    }

    /// <summary>Unix seconds as "2026-11-23 12:00:00 UTC" (UTC: the two hosts may sit in different zones); 0 or less is "-".</summary>
    public static string UnixTime(long seconds) => seconds <= 0 ? "-"
        : DateTimeOffset.FromUnixTimeSeconds(seconds).UtcDateTime.ToString("yyyy-MM-dd HH:mm:ss 'UTC'", CultureInfo.InvariantCulture);

    /// <summary>Unix seconds as ISO 8601 for JSON, null when unknown.</summary>
    public static string? UnixTimeIso(long seconds) => seconds <= 0 ? null
        : DateTimeOffset.FromUnixTimeSeconds(seconds).UtcDateTime.ToString("yyyy-MM-dd'T'HH:mm:ss'Z'", CultureInfo.InvariantCulture);

    /// <summary>Joins argv into a line a POSIX shell runs unchanged (single quotes where needed).</summary>
    public static string ShellCommand(IEnumerable<string> argv) => string.Join(' ', argv.Select(ShellQuote));

    private static string ShellQuote(string word)
    {
        if (word.Length > 0 && word.All(c => char.IsAsciiLetterOrDigit(c) || "-_./:=,+@%".Contains(c)))
        {
            return word;
        }
        return "'" + word.Replace("'", "'\\''", StringComparison.Ordinal) + "'";
    }

    /// <summary>Left-aligned columns separated by two spaces, the last column unpadded.</summary>
    public static string Table(IReadOnlyList<string[]> rows)
    {
        if (rows.Count == 0)
        {
            return "";
        }
        int columns = rows.Max(r => r.Length);
        var widths = new int[columns];
        foreach (string[] row in rows)
        {
            for (int i = 0; i < row.Length; i++)
            {
                widths[i] = Math.Max(widths[i], row[i].Length);
            }
        }
        var text = new StringBuilder();
        foreach (string[] row in rows)
        {
            for (int i = 0; i < row.Length; i++)
            {
                text.Append(i == row.Length - 1 ? row[i] : row[i].PadRight(widths[i] + 2));
            }
            text.Append('\n');
        }
        return text.ToString();
    }
}
