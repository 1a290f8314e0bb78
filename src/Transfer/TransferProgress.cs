using System.Text.Json.Serialization;
using System.Text.Json;

namespace BFMig.Transfer;

/// <summary>
/// Live counters of one stream, reported about every half second while it runs and once at the
/// end (<c>--progress-fd</c>: one JSON object per line).
/// </summary>
/// <param name="Role">"send" or "receive".</param>
/// <param name="Kind">"mig" or "nbd".</param>
/// <param name="LocalBytes">Stream bytes read from the local QEMU (sender) or written to it (receiver) so far.</param>
/// <param name="WireBytesOut">Bytes sent to the peer so far (after elision and compression).</param>
/// <param name="WireBytesIn">Bytes received from the peer so far.</param>
/// <param name="Export">Kind nbd: the export the NBD client opened, once known.</param>
/// <param name="Final">True on the last report of the stream.</param>
public sealed record TransferProgress(string Role, string Kind, long LocalBytes, long WireBytesOut, long WireBytesIn, string? Export, bool Final)
{
    /// <summary>
    /// Receiver: the sender has authenticated. Until a report says so the daemon holds the
    /// helper in a small pool of handshake slots with a deadline, not in a transfer slot.
    /// </summary>
    public bool Authenticated { get; init; }

    /// <summary>
    /// Sender, memory: QEMU advised post-copy RAM on this stream, iterates, and has not closed it
    /// (<see cref="Memory.QemuStreamParser.PostCopyArmed"/>): the next memory connection of the
    /// guest's QEMU is its post-copy preempt channel. Sent out of turn when it changes.
    /// </summary>
    public bool PostCopyArmed { get; init; }

    /// <summary>Bytes this stream moved over the wire in its forward direction.</summary>
    [JsonIgnore]
    public long WireBytes => Role == "send" ? WireBytesOut : WireBytesIn;

    /// <summary>One JSON line (no newline).</summary>
    public string ToJson() => JsonSerializer.Serialize(this, ProgressJsonContext.Default.TransferProgress);

    /// <summary>Parses one line; null when it is not a progress object.</summary>
    public static TransferProgress? TryParse(string line)
    {
        try
        {
            return JsonSerializer.Deserialize(line, ProgressJsonContext.Default.TransferProgress);
        }
        catch (JsonException)
        {
            return null;
        }
    }
}

/// <summary>Writes progress lines to an inherited descriptor (the daemon's pipe); a reader that went away is ignored.</summary>
public sealed class ProgressWriter
{
    private readonly Stream _out;
    private readonly Lock _gate = new();
    private bool _broken;

    private ProgressWriter(Stream output) => _out = output;

    /// <summary>Adopts descriptor <paramref name="fd"/> (write end of a pipe).</summary>
    public static ProgressWriter Open(int fd)
    {
        var handle = new Microsoft.Win32.SafeHandles.SafeFileHandle(fd, ownsHandle: true);
        return new ProgressWriter(new FileStream(handle, FileAccess.Write, bufferSize: 0));
    }

    /// <summary>Writes one line; never throws (progress is a courtesy, the stream is what matters).</summary>
    public void Write(TransferProgress progress)
    {
        lock (_gate)
        {
            if (_broken)
                return;
            try
            {
                _out.Write(System.Text.Encoding.UTF8.GetBytes(progress.ToJson() + "\n"));
            }
            catch (Exception e) when (e is IOException or ObjectDisposedException or UnauthorizedAccessException)
            {
                _broken = true;
            }
        }
    }
}

[JsonSourceGenerationOptions(PropertyNamingPolicy = JsonKnownNamingPolicy.CamelCase, DefaultIgnoreCondition = JsonIgnoreCondition.WhenWritingNull)]
[JsonSerializable(typeof(TransferProgress))]
internal sealed partial class ProgressJsonContext : JsonSerializerContext;
