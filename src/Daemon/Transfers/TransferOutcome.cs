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

/// <summary>Which way a stream goes.</summary>
public enum TransferDirection
{
    /// <summary>From the local QEMU to a peer (this host is the source).</summary>
    Send,

    /// <summary>From a peer to the local QEMU (this host is the destination).</summary>
    Receive,
}

/// <summary>One stream's outcome, as the helper reported it.</summary>
/// <param name="Guest">Guest name.</param>
/// <param name="Uuid">Guest UUID.</param>
/// <param name="Peer">The other host.</param>
/// <param name="Stream">"memory" or "disk".</param>
/// <param name="Direction">Send or receive.</param>
/// <param name="ExitCode">The helper's exit code (0 = done).</param>
/// <param name="Error">The helper's one-line error, null when it succeeded.</param>
/// <param name="Stats">The helper's statistics, when it wrote them.</param>
public sealed record TransferOutcome(string Guest, Guid Uuid, string Peer, string Stream, TransferDirection Direction, int ExitCode, string? Error, TransferStats? Stats)
{
    public bool Ok => ExitCode == 0;
}

/// <summary>Live counters of one running stream (from the helper's <c>--progress-fd</c>).</summary>
/// <param name="Guest">Guest name.</param>
/// <param name="Uuid">Guest UUID.</param>
/// <param name="Peer">The other host.</param>
/// <param name="Stream">"memory", or the disk's target device ("vda"), "disk" while unknown.</param>
/// <param name="Direction">Send or receive.</param>
/// <param name="Progress">The helper's report.</param>
public sealed record StreamProgress(string Guest, Guid Uuid, string Peer, string Stream, TransferDirection Direction, TransferProgress Progress);

/// <summary>A memory stream being sent from here (transparent mode): its guest, and whether it is armed for post-copy (its helper's <see cref="BFMig.Transfer.TransferProgress.PostCopyArmed"/>).</summary>
public readonly record struct OutgoingMemory(Guid Uuid, bool PostCopyArmed);
