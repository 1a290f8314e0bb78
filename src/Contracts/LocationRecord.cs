using System.Text.Json;

namespace BFMig.Contracts;

/// <summary>Where a guest runs, as far as this host knows.</summary>
public enum GuestPlace
{
    /// <summary>On this host.</summary>
    Here,

    /// <summary>On <see cref="LocationRecord.Peer"/>.</summary>
    Away,
}

/// <summary>A trip whose streams ran but which libvirt has not confirmed (or refuted) yet.</summary>
public enum PendingTrip
{
    None,

    /// <summary>The guest is leaving for <see cref="LocationRecord.PendingPeer"/>: confirmed by Stopped/Migrated here.</summary>
    Departing,

    /// <summary>The guest is arriving from <see cref="LocationRecord.PendingPeer"/>: confirmed by Resumed/Migrated here.</summary>
    Arriving,
}

/// <summary>
/// <c>STATE/UUID/location.json</c>, the one record of where a guest runs. bfmigd is its only writer
/// (a GuestSession, when libvirt confirms a trip); the hook and the CLI read it. Kept apart from the
/// transfer store's <c>mem/state.json</c>, which the helpers rewrite at the end of each stream: two
/// writers of one file would undo each other's changes.
/// </summary>
/// <param name="Place">Where the guest runs, as confirmed by libvirt.</param>
/// <param name="Peer">Away: the host it runs on. Here: the host it came from ("" when unknown).</param>
/// <param name="Since">When <paramref name="Place"/> last changed.</param>
/// <param name="Pending">A trip under way, not confirmed yet. <paramref name="Place"/> stays the last confirmed one.</param>
/// <param name="PendingPeer">The other host of the pending trip.</param>
public sealed record LocationRecord(GuestPlace Place, string Peer, DateTimeOffset Since, PendingTrip Pending = PendingTrip.None, string PendingPeer = "")
{
    /// <summary>The file's name inside the guest's state directory.</summary>
    public const string FileName = "location.json";

    /// <summary>Largest file accepted: the record is a few hundred bytes; anything bigger is not one.</summary>
    private const int MaxBytes = 64 * 1024;

    /// <summary>
    /// True when the guest may be running on another host: it is recorded there, or it is leaving
    /// and libvirt has not said whether it arrived. An arrival not yet confirmed does not count as here.
    /// </summary>
    public bool MayRunElsewhere => Place == GuestPlace.Away || Pending == PendingTrip.Departing;

    /// <summary>The host the guest may run on when <see cref="MayRunElsewhere"/>.</summary>
    public string ElsewhereHost => Place == GuestPlace.Away ? Peer : PendingPeer;

    /// <summary><see cref="GuestPlace.Here"/> as the record, the bus API and the CLI spell it.</summary>
    public const string HereText = "here";

    /// <summary><see cref="GuestPlace.Away"/> as the record, the bus API and the CLI spell it.</summary>
    public const string AwayText = "away";

    /// <summary><see cref="HereText"/> or <see cref="AwayText"/>.</summary>
    public static string Spell(GuestPlace place) => place == GuestPlace.Away ? AwayText : HereText;

    /// <summary>The record's JSON (camelCase, as the other state files).</summary>
    public byte[] ToJson()
    {
        using var buffer = new MemoryStream();
        using (var w = new Utf8JsonWriter(buffer, new JsonWriterOptions { Indented = true }))
        {
            w.WriteStartObject();
            w.WriteString("location", Spell(Place));
            w.WriteString("peer", Peer);
            w.WriteString("since", Since);
            if (Pending != PendingTrip.None)
            {
                w.WriteString("pending", Pending == PendingTrip.Departing ? "departing" : "arriving");
                w.WriteString("pendingPeer", PendingPeer);
            }
            w.WriteEndObject();
        }
        return buffer.ToArray();
    }

    /// <summary>Parses a record; null (with <paramref name="problem"/>) when it is not one.</summary>
    public static LocationRecord? Parse(ReadOnlySpan<byte> json, out string? problem)
    {
        problem = null;
        if (json.Length > MaxBytes)
        {
            problem = $"has {json.Length} bytes, more than a location record ever holds";
            return null;
        }
        try
        {
            var reader = new Utf8JsonReader(json);
            using var document = JsonDocument.ParseValue(ref reader);
            var root = document.RootElement;
            if (root.ValueKind != JsonValueKind.Object)
            {
                problem = "is not a JSON object";
                return null;
            }
            var location = String(root, "location");
            var peer = String(root, "peer") ?? "";
            var since = root.TryGetProperty("since", out var s) && s.ValueKind == JsonValueKind.String && s.TryGetDateTimeOffset(out var t) ? t : default;
            GuestPlace place;
            switch (location)
            {
                case HereText:
                    place = GuestPlace.Here;
                    break;
                case AwayText:
                    place = GuestPlace.Away;
                    break;
                default:
                    problem = $"has location '{location}', expected 'here' or 'away'";
                    return null;
            }
            var pendingText = root.TryGetProperty("pending", out var p) && p.ValueKind != JsonValueKind.Null
                ? (p.ValueKind == JsonValueKind.String ? p.GetString() : p.GetRawText())
                : null;
            PendingTrip pending;
            switch (pendingText)
            {
                case null:
                    pending = PendingTrip.None;
                    break;
                case "departing":
                    pending = PendingTrip.Departing;
                    break;
                case "arriving":
                    pending = PendingTrip.Arriving;
                    break;
                default:
                    // Reading it as "no trip" would hide a departure that may have happened.
                    problem = $"has pending '{pendingText}', expected 'departing' or 'arriving'";
                    return null;
            }
            return new LocationRecord(place, peer, since, pending, pending == PendingTrip.None ? "" : String(root, "pendingPeer") ?? "");
        }
        catch (JsonException e)
        {
            problem = "is not valid JSON: " + e.Message;
            return null;
        }
    }

    /// <summary>
    /// Reads the guest's record: <c>location.json</c>, else (a store written before bfmigd owned the
    /// record) the <c>location</c>/<c>peer</c>/<c>since</c> fields of the transfer store's
    /// <c>mem/state.json</c>. Null when there is none (BFMig knows nothing of the guest) or it
    /// cannot be read (<paramref name="problem"/> says why).
    /// </summary>
    public static LocationRecord? Read(string stateDirectory, Guid uuid, out string? problem)
    {
        var path = DefaultPaths.LocationFile(stateDirectory, uuid);
        var bytes = TryRead(path, out problem);
        if (bytes is null && problem is null)
        {
            path = Path.Combine(stateDirectory, uuid.ToString("D"), "mem", "state.json");
            bytes = TryRead(path, out problem);
        }
        if (bytes is null)
            return null;
        var record = Parse(bytes, out var why);
        if (why is not null)
            problem = $"{path} {why}";
        return record;
    }

    private static byte[]? TryRead(string path, out string? problem)
    {
        problem = null;
        try
        {
            using var file = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.ReadWrite);
            if (file.Length > MaxBytes)
            {
                problem = $"{path} has {file.Length} bytes, more than a location record ever holds";
                return null;
            }
            var bytes = new byte[file.Length];
            file.ReadExactly(bytes);
            return bytes;
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
    }

    private static string? String(JsonElement root, string name) =>
        root.TryGetProperty(name, out var value) && value.ValueKind == JsonValueKind.String ? value.GetString() : null;
}
