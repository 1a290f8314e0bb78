using System.Text.Json;
using System.Text.Json.Serialization;

namespace BFMig.Cli;

// What --json prints, one document per command on standard output. Field names are snake_case
// like the D-Bus contract's argument names; sizes are bytes, times ISO 8601 UTC.

internal sealed record GuestJson(string Uuid, string Name, string Location, string Peer, ulong Generation,
    ulong? MemoryBytes, ulong? DiskBytes, ulong RetainedBytes, long SinceUnix, string? Since, TripJson? LastTrip, OnDiskJson? OnDisk);

/// <summary>What the guest's state occupies on this host's disk (null from a daemon that does not say).</summary>
internal sealed record OnDiskJson(ulong MemoryStoreBytes, ulong DiskMapBytes, ulong CheckpointBytes, ulong OtherBytes, ulong TotalBytes,
    long LastChangedUnix, string? LastChanged, ulong AgeSeconds);

/// <summary>How the guest's last migration went (null when none was recorded).</summary>
internal sealed record TripJson(string Direction, string Path, bool MemoryOnly, string Peer, string Reason, long AtUnix, string? At);

/// <param name="Guests">Every retained guest.</param>
/// <param name="OnDiskBytes">All guests' state on this host's disk together (null from a daemon that does not say).</param>
/// <param name="Retention">The daemon's retention limits in one line (null from a daemon that does not say).</param>
internal sealed record ListJson(IReadOnlyList<GuestJson> Guests, ulong? OnDiskBytes, string? Retention);

internal sealed record EstimateJson(string Guest, string Peer, ulong MemoryBytes, ulong DiskBytes, ulong TotalBytes,
    ulong StockMemoryBytes, ulong StockDiskBytes, ulong StockTotalBytes, string Basis);

internal sealed record ForgetJson(string Guest, bool Forgotten);

internal sealed record CheckJson(string Name, bool Passed, string Detail);

internal sealed record DoctorJson(bool Ok, IReadOnlyList<CheckJson> Checks);

internal sealed record StreamJson(string Stream, ulong BytesSent, ulong BytesSaved);

/// <summary>One line of <c>bfmig migrate --json</c> while the trip runs.</summary>
internal sealed record ProgressJson(string Event, string Guest, string Peer, string Stream, ulong BytesSent, ulong BytesSaved);

internal sealed record MigrateJson(string Guest, string Peer, string DestinationUri, string MigrateUri, string DisksUri,
    IReadOnlyList<string> Command, bool DryRun, int? VirshExitCode, bool Ok, ulong BytesSent, ulong BytesSaved,
    IReadOnlyList<StreamJson> Streams, string? Message);

[JsonSourceGenerationOptions(PropertyNamingPolicy = JsonKnownNamingPolicy.SnakeCaseLower, WriteIndented = true)]
[JsonSerializable(typeof(ListJson))]
[JsonSerializable(typeof(EstimateJson))]
[JsonSerializable(typeof(ForgetJson))]
[JsonSerializable(typeof(DoctorJson))]
[JsonSerializable(typeof(MigrateJson))]
[JsonSerializable(typeof(ProgressJson))]
// GetStatus is an a{sv}: its values arrive as these basic types.
[JsonSerializable(typeof(Dictionary<string, object>))]
[JsonSerializable(typeof(string))]
[JsonSerializable(typeof(string[]))]
[JsonSerializable(typeof(bool))]
[JsonSerializable(typeof(byte))]
[JsonSerializable(typeof(short))]
[JsonSerializable(typeof(ushort))]
[JsonSerializable(typeof(int))]
[JsonSerializable(typeof(uint))]
[JsonSerializable(typeof(long))]
[JsonSerializable(typeof(ulong))]
[JsonSerializable(typeof(double))]
internal sealed partial class CliJsonContext : JsonSerializerContext;

internal static class JsonOutput
{
    /// <summary>
    /// The generated metadata with a relaxed encoder: the output goes to a terminal or a script,
    /// never into HTML, so "qemu+ssh://" should read as such rather than "qemu\u002Bssh://".
    /// </summary>
    public static CliJsonContext Context { get; } = new(new JsonSerializerOptions(CliJsonContext.Default.Options)
    {
        Encoder = System.Text.Encodings.Web.JavaScriptEncoder.UnsafeRelaxedJsonEscaping,
    });

    /// <summary>The same, one document per line (JSON lines, for streams of events).</summary>
    public static CliJsonContext LineContext { get; } = new(new JsonSerializerOptions(CliJsonContext.Default.Options)
    {
        Encoder = System.Text.Encodings.Web.JavaScriptEncoder.UnsafeRelaxedJsonEscaping,
        WriteIndented = false,
    });

    private static readonly Lock OutputGate = new();

    public static void Write<T>(T value, System.Text.Json.Serialization.Metadata.JsonTypeInfo<T> typeInfo)
    {
        string text = JsonSerializer.Serialize(value, typeInfo);
        // Progress lines arrive on the bus thread: whole lines only.
        lock (OutputGate)
        {
            Console.Out.WriteLine(text);
            Console.Out.Flush();
        }
    }
}
