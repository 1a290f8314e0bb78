using System.Globalization;
using System.Text;

namespace BFMig.Native.Systemd;

/// <summary>
/// Makes text that someone else chose (a peer's host name or abort reason, a guest's name, a
/// line from a child process) safe to put into one log line. Under systemd every line of stdout
/// is a journal entry and a line starting with <c>&lt;N&gt;</c> sets its priority: an embedded
/// newline followed by <c>&lt;0&gt;</c> would forge an emergency entry (and a console broadcast).
/// Control characters (C0, DEL, C1, and the Unicode line and paragraph separators) become
/// <c>\xNN</c> / <c>\uNNNN</c>, backslashes are doubled so an escape cannot be faked, and the
/// text is cut at <see cref="MaxLength"/> characters with a note of how much was cut.
/// </summary>
public static class LogText
{
    /// <summary>Longest text kept in one field.</summary>
    public const int MaxLength = 512;

    /// <summary>The text as it may appear in a log line (unchanged when already harmless).</summary>
    public static string Escape(string? text)
    {
        if (string.IsNullOrEmpty(text))
            return text ?? "";
        if (text.Length <= MaxLength && !text.AsSpan().ContainsAny(Unsafe))
            return text;
        var b = new StringBuilder(Math.Min(text.Length, MaxLength) + 16);
        int kept = Math.Min(text.Length, MaxLength);
        for (int i = 0; i < kept; i++)
        {
            char c = text[i];
            if (c == '\\')
                b.Append(@"\\");
            else if (c < 0x20 || c == 0x7f || (c >= 0x80 && c < 0xa0))
                b.Append(@"\x").Append(((int)c).ToString("x2", CultureInfo.InvariantCulture));
            else if (c is '\u2028' or '\u2029' or '\u0085')
                b.Append(@"\u").Append(((int)c).ToString("x4", CultureInfo.InvariantCulture));
            else
                b.Append(c);
        }
        if (text.Length > kept)
            b.Append(CultureInfo.InvariantCulture, $"...({text.Length - kept} more characters)");
        return b.ToString();
    }

    private static readonly System.Buffers.SearchValues<char> Unsafe = System.Buffers.SearchValues.Create(BuildUnsafe());

    private static string BuildUnsafe()
    {
        var s = new StringBuilder();
        for (char c = '\0'; c < ' '; c++)
            s.Append(c);
        s.Append('\\').Append('\u007f');
        for (char c = '\u0080'; c < '\u00a0'; c++)
            s.Append(c);
        s.Append('\u2028').Append('\u2029');
        return s.ToString();
    }
}
