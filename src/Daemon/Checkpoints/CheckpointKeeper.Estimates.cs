using System.Collections.Concurrent;
using System.Globalization;
using System.Net.Sockets;
using System.Text.Json;
using System.Text.Json.Serialization;
using BFMig.Daemon.Configuration;
using BFMig.Daemon.Logging;
using BFMig.Native.Libvirt;
using BFMig.Native.Linux;
using BFMig.Transfer.Wire;
using Microsoft.Extensions.Logging;

namespace BFMig.Daemon.Checkpoints;

/// <summary>What the keeper knows that an Estimate asks for: disk changed since the arrival, RAM size, QEMU's dirty rate.</summary>
public sealed partial class CheckpointKeeper
{
    /// <summary>
    /// Bytes written to the guest's disks since it arrived from <paramref name="peer"/>, from the
    /// rolling bitmaps' dirty counts (QEMU's counters; the disk is not read). Null when the guest
    /// is not tracked for that peer, with the reason.
    /// </summary>
    public DiskDelta? DiskSinceArrival(Guid uuid, string peer, out string reason)
    {
        reason = "";
        if (_arrivals.GetValueOrDefault(uuid) is not { } arrival)
        {
            reason = "no rolling bitmap (the guest did not arrive by migration since bfmigd started)";
            return null;
        }
        if (arrival.Peer != peer)
        {
            reason = $"the rolling bitmap counts since the arrival from {arrival.Peer ?? "an unknown host"}, not from {peer}";
            return null;
        }
        try
        {
            using var domain = _openDomain(uuid);
            if (domain is null || !domain.IsActive)
            {
                reason = "the guest does not run here";
                return null;
            }
            var devices = TryQueryBlock(domain);
            ulong bytes = 0;
            var parts = new List<string>();
            foreach (var disk in GuestDisk.FromDomainXml(domain.GetXmlDesc()))
            {
                var bitmap = QemuBlockDevice.ForAlias(devices, disk.Alias)?.Bitmaps.FirstOrDefault(b => b.Name == RollingBitmap);
                if (bitmap is null)
                {
                    reason = $"disk {disk.Target} has no rolling bitmap";
                    return null;
                }
                bytes += bitmap.Count;
                parts.Add($"{disk.Target} {bitmap.Count}");
            }
            var since = (long)(_time.GetUtcNow() - arrival.At).TotalSeconds;
            return new DiskDelta(bytes, $"disk: rolling bitmap {RollingBitmap} since the arrival from {peer} {since} s ago: {string.Join(", ", parts)} bytes written");
        }
        catch (Exception e) when (e is LibvirtException or CheckpointSetException or JsonException or KeyNotFoundException or InvalidOperationException)
        {
            reason = e.Message;
            return null;
        }
    }

    /// <summary>The running guest's memory size, null when it does not run here or libvirt cannot tell.</summary>
    public ulong? MemoryBytes(Guid uuid)
    {
        try
        {
            using var domain = _openDomain(uuid);
            return domain is null || !domain.IsActive ? null : GuestMemory.FromDomainXml(domain.GetXmlDesc());
        }
        catch (Exception e) when (e is LibvirtException or System.Xml.XmlException)
        {
            return null;
        }
    }

    /// <summary>
    /// QEMU's page-sampling dirty rate of the guest's memory in MiB/s (<c>calc-dirty-rate</c> over
    /// one second, then <c>query-dirty-rate</c>), null when it cannot be measured.
    /// </summary>
    public async Task<double?> MeasureDirtyRateAsync(Guid uuid, CancellationToken ct)
    {
        try
        {
            using var domain = _openDomain(uuid);
            if (domain is null || !domain.IsActive)
                return null;
            _qemuMonitor(domain, """{"execute":"calc-dirty-rate","arguments":{"calc-time":1}}""");
            for (int i = 0; i < 20; i++)
            {
                await Task.Delay(TimeSpan.FromMilliseconds(i == 0 ? 1100 : 250), _time, ct).ConfigureAwait(false);
                using var reply = JsonDocument.Parse(_qemuMonitor(domain, """{"execute":"query-dirty-rate"}"""));
                var result = reply.RootElement.GetProperty("return");
                if (result.GetProperty("status").GetString() == "measured")
                    return result.TryGetProperty("dirty-rate", out var rate) ? rate.GetDouble() : null;
            }
            return null;
        }
        catch (Exception e) when (e is LibvirtException or JsonException or KeyNotFoundException or InvalidOperationException)
        {
            return null;
        }
    }
}
