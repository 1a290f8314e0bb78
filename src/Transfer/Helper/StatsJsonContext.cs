using System.Text.Json.Serialization;

namespace BFMig.Transfer.Helper;

// The --stats file: what the daemon and the lab read after the helper exited.
[JsonSourceGenerationOptions(WriteIndented = true, PropertyNamingPolicy = JsonKnownNamingPolicy.CamelCase,
    DefaultIgnoreCondition = JsonIgnoreCondition.WhenWritingNull)]
[JsonSerializable(typeof(TransferStats))]
internal sealed partial class StatsJsonContext : JsonSerializerContext;
