using System.Text.Json;

namespace BFMig.Hooks;

/// <summary>
/// Where bfmigd recorded a guest to run: the <c>location</c>, <c>peer</c> and <c>since</c> fields of
/// <c>/var/lib/bfmig/&lt;uuid&gt;/mem/state.json</c> (the transfer store's StoreState, camelCase JSON).
/// The hook reads it directly, never through the daemon, so the split-brain guard works while the
/// daemon is down.
/// </summary>
internal sealed record GuestLocation(bool Away, string Peer, DateTimeOffset? Since)
{
    /// <summary>Null when there is no record (BFMig knows nothing about the guest) or it cannot be read (see <paramref name="problem"/>).</summary>
    public static GuestLocation? Read(string stateDirectory, string uuid, out string? problem)
    {
        problem = null;
        string path = Path.Combine(stateDirectory, uuid, "mem", "state.json");
        byte[] bytes;
        try
        {
            bytes = File.ReadAllBytes(path);
        }
        catch (Exception e) when (e is FileNotFoundException or DirectoryNotFoundException)
        {
            return null;
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            problem = $"cannot read {path}: {e.Message}";
            return null;
        }
        try
        {
            using JsonDocument document = JsonDocument.Parse(bytes);
            JsonElement root = document.RootElement;
            string? location = root.TryGetProperty("location", out JsonElement l) ? l.GetString() : null;
            string peer = root.TryGetProperty("peer", out JsonElement p) && p.ValueKind == JsonValueKind.String ? p.GetString()! : "";
            DateTimeOffset? since = root.TryGetProperty("since", out JsonElement s) && s.TryGetDateTimeOffset(out DateTimeOffset t) ? t : null;
            switch (location)
            {
                case "here":
                    return new GuestLocation(false, peer, since);
                case "away":
                    return new GuestLocation(true, peer.Length == 0 ? "another host" : peer, since);
                default:
                    problem = $"{path} has location '{location}', expected 'here' or 'away'";
                    return null;
            }
        }
        catch (Exception e) when (e is JsonException or InvalidOperationException)
        {
            problem = $"{path} is not valid JSON: {e.Message}";
            return null;
        }
    }
}
