namespace BFMig.Transfer;

/// <summary>
/// The one path the data path's notes take: a stream that goes on in a degraded way (no store,
/// no disk map, a map left in flux) says so in one line. The library does not choose where the
/// line goes: the bfmig-transfer executable sends it to stderr, which bfmigd logs and the lab
/// greps; without a sink (a host that did not choose one) notes are dropped.
/// </summary>
public static class TransferLog
{
    private static volatile Action<string>? _sink;

    /// <summary>Where notes go from now on (null: nowhere). Called from any thread.</summary>
    public static void UseSink(Action<string>? sink) => _sink = sink;

    /// <summary>Writes one note (a whole line, no newline).</summary>
    public static void Note(string line) => _sink?.Invoke(line);
}
