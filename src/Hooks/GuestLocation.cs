using System.Globalization;

namespace BFMig.Hooks;

/// <summary>
/// The daemon's record of where a guest runs: <c>/var/lib/bfmig/&lt;uuid&gt;/location</c>, one line,
/// either <c>here</c> or <c>away &lt;peer&gt; &lt;since, ISO 8601 UTC&gt;</c>. The hook reads it directly
/// (never the daemon) so that the split-brain guard works while the daemon is down.
/// </summary>
internal sealed record GuestLocation(bool Away, string Peer, DateTimeOffset? Since)
{
    public static readonly GuestLocation Here = new(false, "", null);

    /// <summary>Null when the file is absent (BFMig knows nothing about the guest).</summary>
    public static GuestLocation? Read(string stateDirectory, string uuid, out string? problem)
    {
        problem = null;
        string path = Path.Combine(stateDirectory, uuid, "location");
        string text;
        try
        {
            text = File.ReadAllText(path);
        }
        catch (FileNotFoundException)
        {
            return null;
        }
        catch (DirectoryNotFoundException)
        {
            return null;
        }
        catch (IOException e)
        {
            problem = $"cannot read {path}: {e.Message}";
            return null;
        }
        catch (UnauthorizedAccessException e)
        {
            problem = $"cannot read {path}: {e.Message}";
            return null;
        }
        string[] words = text.Trim().Split(' ', StringSplitOptions.RemoveEmptyEntries);
        switch (words)
        {
            case ["here"]:
                return Here;
            case ["away", var peer]:
                return new GuestLocation(true, peer, null);
            case ["away", var peer, var since]:
                return new GuestLocation(true, peer,
                    DateTimeOffset.TryParse(since, CultureInfo.InvariantCulture, DateTimeStyles.AssumeUniversal, out var t) ? t : null);
            default:
                problem = $"{path} holds '{text.Trim()}', expected 'here' or 'away <peer> <since>'";
                return null;
        }
    }
}
