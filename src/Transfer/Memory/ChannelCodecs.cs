using System.Net.Sockets;

namespace BFMig.Transfer.Memory;

/// <summary>What the main stream's helpers (<see cref="MigSender"/>, <see cref="MigReceiver"/>) do with their trip's <see cref="ChannelCodecService"/>.</summary>
internal static class ChannelCodecs
{
    /// <summary>Starts serving the trip's multifd channels; null (logged) when there is no store or the socket cannot be made: the channels are then carried byte for byte.</summary>
    public static ChannelCodecService? TryStart(MemoryStore? store, bool sending)
    {
        if (store is null) return null;
        try
        {
            return ChannelCodecService.Start(store, sending);
        }
        catch (Exception e) when (e is SocketException or IOException or UnauthorizedAccessException or ArgumentException)
        {
            TransferLog.Note($"bfmig-transfer: no codec socket for this trip's multifd channels ({e.Message}): a sending channel is carried byte for byte, a receiving channel coded by its sender fails");
            return null;
        }
    }

    /// <summary>The channels' pages in the main stream's statistics.</summary>
    public static void Report(ChannelCodecService? channels, TransferStats stats)
    {
        if (channels is not { Channels: > 0 }) return;
        var c = channels.Counts;
        stats.Multifd = $"{channels.Channels} multifd channel(s) coded against the store: {c.PagesElided} pages elided, {c.PagesReferenced} referenced, {c.PagesDelta} delta, {c.PagesFull} full";
        TransferLog.Note($"bfmig-transfer: {stats.Multifd}");
    }
}
