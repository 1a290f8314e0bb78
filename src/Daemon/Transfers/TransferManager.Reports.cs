using System.Globalization;
using System.IO.Pipes;
using System.Net.Sockets;
using System.Text.Json;
using System.Text.Json.Serialization;
using BFMig.Daemon.Configuration;
using BFMig.Daemon.Guests;
using BFMig.Daemon.Logging;
using BFMig.Native.Linux;
using BFMig.Native.Processes;
using BFMig.Transfer;
using BFMig.Transfer.Wire;
using Microsoft.Extensions.Logging;

namespace BFMig.Daemon.Transfers;

/// <summary>What the helpers report: live counters on the progress pipe, and the statistics file at their end.</summary>
public sealed partial class TransferManager
{
    private async Task ReadProgressAsync(Running running, AnonymousPipeServerStream pipe)
    {
        using var reader = new StreamReader(pipe);
        try
        {
            // A helper sends a line twice a second: a longer line is not one of its reports.
            while (await reader.ReadLineAsync().ConfigureAwait(false) is { } line)
            {
                if (line.Length > 4096 || TransferProgress.TryParse(line) is not { } report)
                    continue;
                if (!running.Authenticated)
                {
                    if (!report.Authenticated)
                        continue;
                    OnAuthenticated(running);
                }
                if (running.Direction == TransferDirection.Send && running.Kind == StreamKind.Mig)
                {
                    lock (_gate)
                        running.PostCopyArmed = report.PostCopyArmed && !report.Final;
                }
                var stream = running.Kind == StreamKind.Mig ? StreamName(running.Kind)
                    : running.Disks.FirstOrDefault(d => report.Export is { } e && d.ExportNames.Contains(e))?.Target ?? StreamName(running.Kind);
                var progress = new StreamProgress(running.Guest, running.Uuid, running.Peer, stream, running.Direction, report);
                Raise(() => Progressed?.Invoke(progress));
            }
        }
        catch (IOException)
        {
            // The helper's end is gone; its exit is reported by the watcher.
        }
    }

    private static TransferStats? ReadStats(string path)
    {
        try
        {
            return File.Exists(path) ? JsonSerializer.Deserialize(File.ReadAllBytes(path), DaemonStatsJsonContext.Default.TransferStats) : null;
        }
        catch (Exception e) when (e is IOException or JsonException)
        {
            return null;
        }
    }
}

/// <summary>Reads the helper's <c>--stats</c> JSON with the conventions it writes it with.</summary>
[JsonSourceGenerationOptions(PropertyNamingPolicy = JsonKnownNamingPolicy.CamelCase)]
[JsonSerializable(typeof(TransferStats))]
internal sealed partial class DaemonStatsJsonContext : JsonSerializerContext;
