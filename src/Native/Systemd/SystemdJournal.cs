using System.Runtime.CompilerServices;
using System.Text;

namespace BFMig.Native.Systemd;

/// <summary>syslog priorities as journald stores them in PRIORITY=.</summary>
public enum JournalPriority
{
    Emergency = 0,
    Alert = 1,
    Critical = 2,
    Error = 3,
    Warning = 4,
    Notice = 5,
    Informational = 6,
    Debug = 7,
}

/// <summary>
/// Structured logging to journald with sd_journal_sendv: MESSAGE, PRIORITY, SYSLOG_IDENTIFIER,
/// CODE_FILE/CODE_LINE/CODE_FUNC and any custom fields, each as one iovec (values may span lines).
/// </summary>
public static class SystemdJournal
{
    /// <summary>The socket journald listens on.</summary>
    public const string SocketPath = "/run/systemd/journal/socket";

    /// <summary>True when a journald socket exists on this host.</summary>
    public static bool IsAvailable => File.Exists(SocketPath);

    /// <summary>
    /// Sends one entry. Returns 0 or a negative errno; never throws for an unreachable journal.
    /// libsystemd returns 0 and drops the entry when journald is not running (its sendmsg ENOENT
    /// is "fail silently" in journal-send.c): check <see cref="IsAvailable"/> to decide on a
    /// fallback such as the console. Throws <see cref="ArgumentException"/> for an invalid field name.
    /// </summary>
    public static int Send(JournalPriority priority, string message, string? syslogIdentifier = null,
        IEnumerable<KeyValuePair<string, string>>? fields = null,
        [CallerFilePath] string codeFile = "", [CallerLineNumber] int codeLine = 0, [CallerMemberName] string codeFunc = "") =>
        Interop.SdJournal.SendV(BuildFields(priority, message, syslogIdentifier, fields, codeFile, codeLine, codeFunc));

    /// <summary>The "FIELD=value" entries <see cref="Send"/> passes to sd_journal_sendv, in order.</summary>
    internal static List<byte[]> BuildFields(JournalPriority priority, string message, string? syslogIdentifier,
        IEnumerable<KeyValuePair<string, string>>? fields, string codeFile, int codeLine, string codeFunc)
    {
        ArgumentNullException.ThrowIfNull(message);
        var result = new List<byte[]>
        {
            Field("MESSAGE", message),
            Field("PRIORITY", ((int)priority).ToString(System.Globalization.CultureInfo.InvariantCulture)),
        };
        if (!string.IsNullOrEmpty(syslogIdentifier))
        {
            result.Add(Field("SYSLOG_IDENTIFIER", syslogIdentifier));
        }
        if (!string.IsNullOrEmpty(codeFile))
        {
            result.Add(Field("CODE_FILE", codeFile));
            result.Add(Field("CODE_LINE", codeLine.ToString(System.Globalization.CultureInfo.InvariantCulture)));
            result.Add(Field("CODE_FUNC", codeFunc));
        }
        foreach (var (name, value) in fields ?? [])
        {
            ValidateFieldName(name);
            result.Add(Field(name, value ?? ""));
        }
        return result;
    }

    /// <summary>journald's rule: 1-64 characters of A-Z, 0-9 and '_', not starting with '_' (trusted fields) or a digit.</summary>
    internal static void ValidateFieldName(string name)
    {
        bool valid = !string.IsNullOrEmpty(name) && name.Length <= 64 && name[0] != '_' && !char.IsAsciiDigit(name[0])
            && name.All(c => c is (>= 'A' and <= 'Z') or (>= '0' and <= '9') or '_');
        if (!valid)
        {
            throw new ArgumentException($"'{name}' is not a valid journal field name (A-Z, 0-9, '_', at most 64, not starting with '_' or a digit)", nameof(name));
        }
    }

    private static byte[] Field(string name, string value) => Encoding.UTF8.GetBytes($"{name}={value}");
}
