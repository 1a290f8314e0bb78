using System.Collections.Concurrent;
using System.Globalization;
using System.Net.Sockets;
using System.Text.Json.Serialization;
using System.Text.Json;
using BFMig.Daemon.Configuration;
using BFMig.Daemon.Logging;
using BFMig.Daemon.Transfers;
using BFMig.Native.Libvirt;
using BFMig.Native.Linux;
using BFMig.Transfer.Disk;
using BFMig.Transfer.Wire;
using Microsoft.Extensions.Logging;

namespace BFMig.Daemon.Checkpoints;

/// <summary>Where a guest's rolling bitmap started counting: its arrival from a peer.</summary>
public sealed record Arrival(string? Peer, DateTimeOffset At);

/// <summary>The rolling-bitmap part of an estimate: bytes written since arrival, and what that rests on.</summary>
public sealed record DiskDelta(ulong Bytes, string Basis);

/// <summary>
/// Keeps checkpoints and persistent bitmaps whole across migrations (libvirt carries the bitmaps
/// but not the checkpoint metadata, and leaves stale in-use bitmaps in the image the guest left):
/// <list type="bullet">
/// <item>source, when a trip's first stream connects: reads the guest's checkpoint XMLs and sends them to the destination daemon;</item>
/// <item>destination, on the resumed/migrated event: redefines them parents first, checks each bitmap exists in QEMU, starts the rolling bitmap;</item>
/// <item>source, once the departure is known (QEMU gone, trip ended): removes stale in-use bitmaps and BFMig's own from the images BFMig carried and left behind.</item>
/// </list>
/// Every step logs and never throws into the event path: a failure here costs the metadata, never the guest.
/// </summary>
public sealed partial class CheckpointKeeper
{
    /// <summary>
    /// BFMig's rolling bitmap on every disk. libvirt refuses '/' in checkpoint names, so no
    /// checkpoint bitmap can have this name. It is not persistent on purpose: libvirt migrates
    /// persistent bitmaps, which would put a same-name bitmap into the image a return trip writes
    /// into (QEMU then fails the migration) and add a dirty-bitmap section to the memory stream.
    /// </summary>
    public const string RollingBitmap = "bfmig/rolling";

    /// <summary>Prefix of every bitmap BFMig owns.</summary>
    public const string OwnPrefix = "bfmig/";

    private const ulong RollingGranularity = 65536;
    private static readonly TimeSpan PendingWait = TimeSpan.FromSeconds(20);
    private static readonly TimeSpan ExchangeTimeout = TimeSpan.FromSeconds(30);

    private readonly DaemonOptions _options;
    private readonly Func<Guid, LibvirtDomain?> _openDomain;
    private readonly ImageBitmaps _images;
    private readonly ILogger _logger;
    private readonly TimeProvider _time;
    private readonly CancellationToken _stop;
    private readonly ConcurrentDictionary<Guid, Arrival> _arrivals = new();
    private readonly Dictionary<Guid, Task> _sending = [];

    /// <summary>QMP to a guest's QEMU (libvirt's qemu-monitor-command; tests on the test driver stand in for QEMU).</summary>
    private readonly Func<LibvirtDomain, string, string> _qemuMonitor;

    public CheckpointKeeper(DaemonOptions options, Func<Guid, LibvirtDomain?> openDomain, ImageBitmaps images, ILogger logger,
        TimeProvider? time = null, CancellationToken stop = default, Func<LibvirtDomain, string, string>? qemuMonitor = null,
        LogRateLimiter? rejections = null)
    {
        _rejections = rejections;
        _qemuMonitor = qemuMonitor ?? ((domain, command) => domain.QemuMonitorCommand(command));
        _options = options;
        _openDomain = openDomain;
        _images = images;
        _logger = logger;
        _time = time ?? TimeProvider.System;
        _stop = stop;
    }

    private string Directory(Guid uuid) => Path.Combine(_options.StateDirectory, uuid.ToString("D"), "checkpoints");

    /// <summary>The file holding checkpoints received for the next arrival.</summary>
    public string PendingPath(Guid uuid) => Path.Combine(Directory(uuid), "pending.json");

    /// <summary>What the last arrival did (redefined, missing bitmaps), for operators and tests.</summary>
    public string StatusPath(Guid uuid) => Path.Combine(Directory(uuid), "status.json");

    /// <summary>The arrival the rolling bitmap counts from, null when it is not tracking (booted here, or gone).</summary>
    public Arrival? ArrivalOf(Guid uuid) => _arrivals.GetValueOrDefault(uuid);

    // ---- source: before the trip ----

    /// <summary>
    /// A stream of a trip to <paramref name="peer"/> connected: read the checkpoints now (the guest
    /// still runs here) and send them. Runs in the background; a send already under way is not repeated.
    /// </summary>
    public Task OnTripStarting(Guid uuid, string guest, PeerOptions peer)
    {
        lock (_sending)
        {
            if (_sending.TryGetValue(uuid, out var running) && !running.IsCompleted)
                return running;
            var task = Task.Run(() => SendAsync(uuid, guest, peer));
            _sending[uuid] = task;
            return task;
        }
    }

    private async Task SendAsync(Guid uuid, string guest, PeerOptions peer)
    {
        try
        {
            CheckpointSnapshot snapshot;
            using (var domain = _openDomain(uuid) ?? throw new CheckpointSetException("libvirt does not know the guest (or is unreachable)"))
            {
                snapshot = ReadCheckpoints(domain, uuid, _options.HostName, _time.GetUtcNow());
            }
            var auth = PeerCredentials.ForSending(_options, peer);
            await CheckpointExchange.SendAsync(peer.Host, peer.Port, auth, _options.HostName, uuid, snapshot, ExchangeTimeout, _stop).ConfigureAwait(false);
            DaemonLog.CheckpointsSent(_logger, guest, snapshot.Checkpoints.Count, peer.Name);
        }
        catch (Exception e) when (e is CheckpointSetException or LibvirtException or PeerProtocolException or PeerAuthenticationException
            or SocketException or IOException or TimeoutException or OperationCanceledException or UnauthorizedAccessException)
        {
            DaemonLog.CheckpointsNotSent(_logger, guest, peer.Name, e.Message);
        }
    }

    /// <summary>The guest's checkpoints as libvirt describes them (parents first).</summary>
    public static CheckpointSnapshot ReadCheckpoints(LibvirtDomain domain, Guid uuid, string source, DateTimeOffset now)
    {
        var xmls = new List<string>();
        foreach (var checkpoint in domain.ListAllCheckpoints(LibvirtCheckpointListFlags.Topological))
        {
            using (checkpoint)
                xmls.Add(checkpoint.GetXmlDesc());
        }
        return new CheckpointSnapshot(uuid.ToString("D"), source, now.ToUnixTimeSeconds(), xmls);
    }

    // ---- destination: the control exchange ----

    /// <summary>Control exchanges served at once, at most: a real source sends one per trip.</summary>
    public const int MaxServing = 4;

    private int _serving;
    private int _servingStrangers;
    // The peer port's one rate limit: a refused or failed exchange may come from anyone who saw a route frame.
    private readonly LogRateLimiter? _rejections;

    private void Refused(string remote, string reason) =>
        PeerListener.LogRejection(_logger, _rejections, () => DaemonLog.CheckpointsRefused(_logger, remote, reason));

    /// <summary>
    /// Serves one control connection (its hello or route, <paramref name="route"/>, was peeked by
    /// the listener). Owns <paramref name="connection"/>. Beyond <see cref="MaxServing"/> at once,
    /// or beyond the strangers' share of them for a connection from an address of no configured
    /// peer (<paramref name="stranger"/>, <see cref="PeerListener.StrangersShare"/>), a connection
    /// is closed at once: a source sends its checkpoints once per trip, so exchanges that stall
    /// before they authenticate must not take every place.
    /// </summary>
    public async Task ServeAsync(Socket connection, RouteRequest route, bool stranger = false)
    {
        var remote = connection.RemoteEndPoint?.ToString() ?? "?";
        // The strangers' share first: a stranger refused by it never counts against the peers' places.
        if (stranger && Interlocked.Increment(ref _servingStrangers) > PeerListener.StrangersShare(MaxServing))
        {
            Interlocked.Decrement(ref _servingStrangers);
            connection.Dispose();
            Refused(remote, $"{PeerListener.StrangersShare(MaxServing)} checkpoint exchanges from addresses of no configured peer already running");
            return;
        }
        if (Interlocked.Increment(ref _serving) > MaxServing)
        {
            Interlocked.Decrement(ref _serving);
            if (stranger)
                Interlocked.Decrement(ref _servingStrangers);
            connection.Dispose();
            Refused(remote, $"{MaxServing} checkpoint exchanges already running");
            return;
        }
        try
        {
            using (connection)
            await using (var stream = new NetworkStream(connection, ownsSocket: false))
            {
                var auth = PeerCredentials.ForReceiving(_options, route.SenderName);
                await CheckpointExchange.ServeAsync(stream, auth, Store, ExchangeTimeout, _stop).ConfigureAwait(false);
            }
        }
        catch (Exception e) when (e is CheckpointSetException or PeerProtocolException or PeerAuthenticationException
            or SocketException or IOException or TimeoutException or OperationCanceledException or UnauthorizedAccessException)
        {
            Refused(remote, e.Message);
        }
        finally
        {
            if (stranger)
                Interlocked.Decrement(ref _servingStrangers);
            Interlocked.Decrement(ref _serving);
        }
    }

    /// <summary>Keeps a received snapshot for the arrival (checks that it parses and orders first). Null = stored.</summary>
    public string? Store(Hello hello, CheckpointSnapshot snapshot)
    {
        if (!_options.Peers.Any(p => p.Name == hello.SenderName))
            return $"'{hello.SenderName}' is not a configured peer";
        var ordered = CheckpointOrder.ParentsFirst(snapshot.Checkpoints.Select(CheckpointRecord.Parse));
        var dir = Directory(hello.Guest);
        System.IO.Directory.CreateDirectory(dir);
        var temp = PendingPath(hello.Guest) + ".tmp";
        using (var file = new FileStream(temp, FileMode.Create, FileAccess.Write, FileShare.None))
        {
            file.Write(CheckpointExchange.Encode(snapshot));
            file.Flush(flushToDisk: true);
        }
        DurableFile.Replace(temp, PendingPath(hello.Guest));
        DaemonLog.CheckpointsReceived(_logger, hello.Guest.ToString("D"), ordered.Count, hello.SenderName);
        return null;
    }

    // ---- destination: after the guest resumed here ----

    /// <summary>The guest resumed here after an incoming migration from <paramref name="peer"/>.</summary>
    public Task OnArrived(Guid uuid, string guest, string? peer) => Task.Run(() => ArriveAsync(uuid, guest, peer));

    private async Task ArriveAsync(Guid uuid, string guest, string? peer)
    {
        var arrivedAt = _time.GetUtcNow();
        var status = new ArrivalStatus { Guest = guest, From = peer, ArrivedAtUnixSeconds = arrivedAt.ToUnixTimeSeconds() };
        try
        {
            using var domain = _openDomain(uuid) ?? throw new CheckpointSetException("libvirt does not know the guest (or is unreachable)");
            // The rolling bitmap first: the guest runs already, every write from now on counts.
            status.Rolling = StartRolling(domain);
            _arrivals[uuid] = new Arrival(peer, arrivedAt);
            var snapshot = await WaitForPendingAsync(uuid).ConfigureAwait(false);
            if (snapshot is null)
            {
                status.Note = "no checkpoint metadata arrived from the source (its bfmigd did not send any)";
                DaemonLog.CheckpointsMissing(_logger, guest);
            }
            else
            {
                Redefine(domain, guest, CheckpointOrder.ParentsFirst(snapshot.Checkpoints.Select(CheckpointRecord.Parse)), status);
                DurableFile.Replace(PendingPath(uuid), Path.Combine(Directory(uuid), "applied.json"));
            }
        }
        catch (Exception e) when (e is CheckpointSetException or LibvirtException or IOException or JsonException or UnauthorizedAccessException)
        {
            status.Note = e.Message;
            DaemonLog.CheckpointsNotRedefined(_logger, guest, e.Message);
        }
        WriteStatus(uuid, status);
    }

    private async Task<CheckpointSnapshot?> WaitForPendingAsync(Guid uuid)
    {
        var deadline = _time.GetUtcNow() + PendingWait;
        while (true)
        {
            if (File.Exists(PendingPath(uuid)))
                return CheckpointExchange.Decode(await File.ReadAllBytesAsync(PendingPath(uuid), _stop).ConfigureAwait(false));
            if (_time.GetUtcNow() > deadline)
                return null;
            await Task.Delay(TimeSpan.FromMilliseconds(250), _time, _stop).ConfigureAwait(false);
        }
    }

    /// <summary>
    /// Makes libvirt's checkpoint list here equal to <paramref name="ordered"/>: metadata of
    /// checkpoints the source no longer has is dropped (bitmaps stay), each carried one is
    /// redefined parents first, then each checkpoint's bitmaps are looked up in QEMU.
    /// </summary>
    public void Redefine(LibvirtDomain domain, string guest, IReadOnlyList<CheckpointRecord> ordered, ArrivalStatus status)
    {
        var wanted = ordered.Select(c => c.Name).ToHashSet(StringComparer.Ordinal);
        var existing = domain.ListAllCheckpoints(LibvirtCheckpointListFlags.Topological);
        foreach (var stale in existing.Reverse())
        {
            using (stale)
            {
                var name = stale.Name;
                if (!wanted.Contains(name))
                {
                    stale.Delete(LibvirtCheckpointDeleteFlags.MetadataOnly);
                    status.Dropped.Add(name);
                }
                else
                {
                    // The carried set is the truth: its records replace what this host remembers from an earlier stay.
                    stale.Delete(LibvirtCheckpointDeleteFlags.MetadataOnly);
                }
            }
        }
        foreach (var checkpoint in ordered)
        {
            try
            {
                using var _ = domain.CreateCheckpoint(checkpoint.Xml, LibvirtCheckpointCreateFlags.Redefine);
                status.Redefined.Add(checkpoint.Name);
            }
            catch (LibvirtException e)
            {
                status.Failed.Add($"{checkpoint.Name}: {e.Message}");
                DaemonLog.CheckpointNotRedefined(_logger, guest, checkpoint.Name, e.Message);
            }
        }
        var devices = TryQueryBlock(domain);
        var disks = GuestDisk.FromDomainXml(domain.GetXmlDesc());
        foreach (var checkpoint in ordered)
        {
            foreach (var disk in checkpoint.Disks)
            {
                var device = QemuBlockDevice.ForAlias(devices, disks.FirstOrDefault(d => d.Target == disk.Disk)?.Alias);
                var bitmap = device?.Bitmaps.FirstOrDefault(b => b.Name == disk.Bitmap);
                if (bitmap is null || bitmap.Inconsistent)
                    status.MissingBitmaps.Add($"{checkpoint.Name}:{disk.Disk}:{disk.Bitmap}");
            }
        }
        DaemonLog.CheckpointsRedefined(_logger, guest, status.Redefined.Count, ordered.Count,
            status.MissingBitmaps.Count == 0 ? "every bitmap present" : "missing bitmaps: " + string.Join(", ", status.MissingBitmaps));
    }

    private IReadOnlyList<QemuBlockDevice> TryQueryBlock(LibvirtDomain domain)
    {
        try
        {
            return QemuBlockDevice.FromQueryBlock(_qemuMonitor(domain, """{"execute":"query-block"}"""));
        }
        catch (LibvirtException)
        {
            return [];
        }
    }

    /// <summary>(Re)creates the rolling bitmap on every disk of the running guest; returns the disks it tracks.</summary>
    public List<string> StartRolling(LibvirtDomain domain)
    {
        var tracked = new List<string>();
        var devices = TryQueryBlock(domain);
        foreach (var disk in GuestDisk.FromDomainXml(domain.GetXmlDesc()))
        {
            if (QemuBlockDevice.ForAlias(devices, disk.Alias) is not { } device)
                continue;
            if (device.Bitmaps.Any(b => b.Name == RollingBitmap))
                Qmp(domain, "block-dirty-bitmap-remove", device.NodeName, "");
            Qmp(domain, "block-dirty-bitmap-add", device.NodeName,
                string.Create(CultureInfo.InvariantCulture, $",\"persistent\":false,\"granularity\":{RollingGranularity}"));
            tracked.Add(disk.Target);
        }
        return tracked;
    }

    private void Qmp(LibvirtDomain domain, string command, string node, string extra) =>
        _qemuMonitor(domain, $"{{\"execute\":\"{command}\",\"arguments\":{{\"node\":{JsonSerializer.Serialize(node, CheckpointStatusJsonContext.Default.String)},\"name\":\"{RollingBitmap}\"{extra}}}}}");

    private void WriteStatus(Guid uuid, ArrivalStatus status)
    {
        try
        {
            System.IO.Directory.CreateDirectory(Directory(uuid));
            File.WriteAllBytes(StatusPath(uuid), JsonSerializer.SerializeToUtf8Bytes(status, CheckpointStatusJsonContext.Default.ArrivalStatus));
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            DaemonLog.CheckpointsNotRedefined(_logger, status.Guest, $"cannot write {StatusPath(uuid)}: {e.Message}");
        }
    }

    // ---- source: after the guest left ----

    /// <summary>
    /// The guest left (stopped/migrated: its QEMU here is gone). Removes from the images it left
    /// behind every bitmap flagged in use (stale: the live copies went with the guest, and a
    /// same-name bitmap makes QEMU fail the return trip) and BFMig's own. Only the images
    /// <see cref="Guests.ImageCustody"/> says BFMig carried on this trip: any other image may be
    /// the one the guest now runs from on the destination (shared storage), and is never opened.
    /// </summary>
    public Task OnDeparted(Guid uuid, string guest, IReadOnlyList<BFMig.Transfer.Disk.DiskImageSpec> carried)
    {
        _arrivals.TryRemove(uuid, out _);
        return Task.Run(async () =>
        {
            foreach (var image in carried.Where(i => i.Format == "qcow2"))
                await CleanImageAsync(guest, image.Path).ConfigureAwait(false);
        });
    }

    /// <summary>Removes stale bitmaps from one image (see <see cref="ImageBitmaps.RemoveStaleAsync"/>) and logs what it did.</summary>
    public async Task<IReadOnlyList<string>> CleanImageAsync(string guest, string image)
    {
        try
        {
            var removed = await _images.RemoveStaleAsync(image, OwnPrefix, TimeSpan.FromSeconds(30), _stop).ConfigureAwait(false);
            DaemonLog.DepartureCleaned(_logger, guest, image, removed.Count == 0 ? "none" : string.Join(", ", removed));
            return removed;
        }
        catch (Exception e) when (e is IOException or JsonException or OperationCanceledException)
        {
            DaemonLog.DepartureNotCleaned(_logger, guest, image, e.Message);
            return [];
        }
    }

    // ---- estimates ----
}

/// <summary>What the last arrival did, written to <c>STATE/UUID/checkpoints/status.json</c>.</summary>
public sealed class ArrivalStatus
{
    public string Guest { get; set; } = "";
    public string? From { get; set; }
    public long ArrivedAtUnixSeconds { get; set; }
    public List<string> Redefined { get; set; } = [];
    public List<string> Dropped { get; set; } = [];
    public List<string> Failed { get; set; } = [];
    public List<string> MissingBitmaps { get; set; } = [];
    public List<string> Rolling { get; set; } = [];
    public string? Note { get; set; }
}

[JsonSourceGenerationOptions(PropertyNamingPolicy = JsonKnownNamingPolicy.CamelCase)]
[JsonSerializable(typeof(ArrivalStatus))]
[JsonSerializable(typeof(string))]
internal sealed partial class CheckpointStatusJsonContext : JsonSerializerContext;
