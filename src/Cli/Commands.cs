using System.Globalization;
using BFMig.Contracts;

namespace BFMig.Cli;

/// <summary>Options every command shares.</summary>
internal sealed record GlobalOptions(bool Json, string? BusAddress);

/// <summary>status, list, estimate, forget and doctor: one daemon call each, then text or JSON.</summary>
internal static class Commands
{
    // The a{sv} keys the contract names, in the order an operator reads them.
    private static readonly (string Key, string Label)[] StatusLabels =
    [
        ("host_name", "host"),
        ("version", "version"),
        ("uptime_seconds", "uptime"),
        ("peers", "peers"),
        ("active_transfers", "active transfers"),
    ];

    public static int Status(GlobalOptions options)
    {
        using DaemonClient client = DaemonClient.Connect(DaemonClient.ResolveAddress(options.BusAddress));
        Dictionary<string, object> status = client.GetStatus();
        if (options.Json)
        {
            JsonOutput.Write(status, JsonOutput.Context.DictionaryStringObject);
            return 0;
        }
        var rows = new List<string[]> { new[] { "bfmigd:", $"running on {client.BusDescription}" } };
        foreach (var (key, label) in StatusLabels)
        {
            if (status.TryGetValue(key, out object? value))
            {
                rows.Add([label + ":", key == "uptime_seconds" && ToUInt64(value) is { } seconds ? Format.Duration(seconds) : Text(value)]);
            }
        }
        foreach (var (key, value) in status.OrderBy(p => p.Key, StringComparer.Ordinal))
        {
            if (!StatusLabels.Any(l => l.Key == key))
            {
                rows.Add([key.Replace('_', ' ') + ":", Text(value)]);
            }
        }
        Console.Out.Write(Format.Table(rows));
        return 0;
    }

    private static string Text(object value) => value switch
    {
        string[] { Length: 0 } => "(none)",
        string[] items => string.Join(", ", items),
        bool b => b ? "yes" : "no",
        IFormattable f => f.ToString(null, CultureInfo.InvariantCulture),
        _ => value.ToString() ?? "",
    };

    private static ulong? ToUInt64(object value) => value switch
    {
        ulong t => t,
        long x when x >= 0 => (ulong)x,
        uint u => u,
        int i when i >= 0 => (ulong)i,
        _ => null,
    };

    public static int List(GlobalOptions options)
    {
        using DaemonClient client = DaemonClient.Connect(DaemonClient.ResolveAddress(options.BusAddress));
        IReadOnlyList<RetainedGuest> guests = client.ListGuests();
        Dictionary<string, LastTrip> trips = client.ListTrips().GroupBy(t => t.Uuid).ToDictionary(g => g.Key, g => g.Last());
        (IReadOnlyList<StoreCost> costList, string? limits) = client.ListStoreCosts();
        Dictionary<string, StoreCost> costs = costList.GroupBy(c => c.Uuid).ToDictionary(g => g.Key, g => g.Last());
        ulong? onDisk = limits is null ? null : (ulong)costList.Sum(c => (decimal)c.TotalBytes);
        long now = DateTimeOffset.UtcNow.ToUnixTimeSeconds();
        if (options.Json)
        {
            JsonOutput.Write(new ListJson([.. guests.Select(g => new GuestJson(g.Uuid, g.Name, g.Location, g.Peer, g.Generation,
                g.MemoryBytes, g.DiskBytes, g.RetainedBytes, g.SinceUnixSeconds, Format.UnixTimeIso(g.SinceUnixSeconds),
                trips.TryGetValue(g.Uuid, out LastTrip? t) ? new TripJson(t.Direction, t.Path, t.MemoryOnly, t.Peer, t.Reason, t.AtUnixSeconds, Format.UnixTimeIso(t.AtUnixSeconds)) : null,
                costs.TryGetValue(g.Uuid, out StoreCost? c) ? new OnDiskJson(c.MemoryStoreBytes, c.DiskMapBytes, c.CheckpointBytes, c.OtherBytes, c.TotalBytes,
                    c.LastChangedUnixSeconds, Format.UnixTimeIso(c.LastChangedUnixSeconds), Age(c, now)) : null))], onDisk, limits),
                JsonOutput.Context.ListJson);
            return 0;
        }
        if (guests.Count == 0)
        {
            Console.Out.WriteLine("no retained guests");
            return 0;
        }
        var rows = new List<string[]> { new[] { "GUEST", "WHERE", "SINCE", "GEN", "MEMORY", "DISK", "TOTAL", "ON DISK", "AGE", "UUID", "LAST TRIP" } };
        foreach (RetainedGuest g in guests.OrderBy(g => g.Name, StringComparer.Ordinal))
        {
            StoreCost? cost = costs.GetValueOrDefault(g.Uuid);
            rows.Add([
                g.Name,
                Where(g),
                Format.UnixTime(g.SinceUnixSeconds),
                g.Generation.ToString(CultureInfo.InvariantCulture),
                g.MemoryBytes is { } m ? Format.Bytes(m) : "-",
                g.DiskBytes is { } d ? Format.Bytes(d) : "-",
                Format.Bytes(g.RetainedBytes),
                cost is null ? "-" : Format.Bytes(cost.TotalBytes),
                cost is null ? "-" : Format.Duration(Age(cost, now)),
                g.Uuid,
                trips.TryGetValue(g.Uuid, out LastTrip? t) ? $"{t.Direction} {t.Summary}" : "-",
            ]);
        }
        Console.Out.Write(Format.Table(rows));
        if (onDisk is { } total)
        {
            Console.Out.WriteLine($"on disk: {Format.Bytes(total)} in all (memory stores {Format.Bytes(Sum(costList, c => c.MemoryStoreBytes))}, " +
                $"disk maps {Format.Bytes(Sum(costList, c => c.DiskMapBytes))}, checkpoints {Format.Bytes(Sum(costList, c => c.CheckpointBytes))}); retention: {limits}");
        }
        return 0;
    }

    private static ulong Age(StoreCost cost, long now) => (ulong)Math.Max(0, now - cost.LastChangedUnixSeconds);

    private static ulong Sum(IEnumerable<StoreCost> costs, Func<StoreCost, ulong> part) => (ulong)costs.Sum(c => (decimal)part(c));

    private static string Where(RetainedGuest g) => g.Location switch
    {
        LocationRecord.HereText when g.Peer.Length > 0 => $"{LocationRecord.HereText} (from {g.Peer})",
        LocationRecord.AwayText => g.Peer.Length > 0 ? $"{LocationRecord.AwayText} at {g.Peer}" : LocationRecord.AwayText,
        _ => g.Location,
    };

    public static int Estimate(GlobalOptions options, string guest, string peer)
    {
        using DaemonClient client = DaemonClient.Connect(DaemonClient.ResolveAddress(options.BusAddress));
        TripEstimate e = client.Estimate(guest, peer);
        ulong total = e.MemoryBytes + e.DiskBytes, stockTotal = e.StockMemoryBytes + e.StockDiskBytes;
        if (options.Json)
        {
            JsonOutput.Write(new EstimateJson(guest, peer, e.MemoryBytes, e.DiskBytes, total,
                e.StockMemoryBytes, e.StockDiskBytes, stockTotal, e.Basis), JsonOutput.Context.EstimateJson);
            return 0;
        }
        Console.Out.WriteLine($"trip of {guest} to {peer}:");
        Console.Out.Write(Format.Table([
            ["", "BFMIG", "STOCK", "SAVED"],
            ["memory", Format.Bytes(e.MemoryBytes), Format.Bytes(e.StockMemoryBytes), Saved(e.MemoryBytes, e.StockMemoryBytes)],
            ["disk", Format.Bytes(e.DiskBytes), Format.Bytes(e.StockDiskBytes), Saved(e.DiskBytes, e.StockDiskBytes)],
            ["total", Format.Bytes(total), Format.Bytes(stockTotal), Saved(total, stockTotal)],
        ]));
        Console.Out.WriteLine($"basis: {e.Basis}");
        return 0;
    }

    private static string Saved(ulong bfmig, ulong stock) => bfmig >= stock ? Format.Percent(0, stock) : Format.Percent(stock - bfmig, stock);

    public static int Forget(GlobalOptions options, string guest)
    {
        using DaemonClient client = DaemonClient.Connect(DaemonClient.ResolveAddress(options.BusAddress));
        client.Forget(guest);
        if (options.Json)
        {
            JsonOutput.Write(new ForgetJson(guest, Forgotten: true), JsonOutput.Context.ForgetJson);
        }
        else
        {
            Console.Out.WriteLine($"forgot everything retained for {guest}: its next trip sends everything");
        }
        return 0;
    }

    public static int Doctor(GlobalOptions options)
    {
        var checks = new List<DoctorCheck>();
        string? address = DaemonClient.ResolveAddress(options.BusAddress);
        try
        {
            using DaemonClient client = DaemonClient.Connect(address);
            IReadOnlyList<DoctorCheck> fromDaemon = client.Doctor();
            checks.Add(new DoctorCheck("daemon", true, $"bfmigd answers on {client.BusDescription}"));
            checks.AddRange(fromDaemon);
        }
        catch (CommandFailedException e)
        {
            // Without the daemon, say so and still check what can be checked from here.
            checks.Add(new DoctorCheck("daemon", false, e.Message));
            checks.AddRange(LocalChecks.Run());
        }
        int failed = checks.Count(c => !c.Passed);
        if (options.Json)
        {
            JsonOutput.Write(new DoctorJson(failed == 0, [.. checks.Select(c => new CheckJson(c.Name, c.Passed, c.Detail))]),
                JsonOutput.Context.DoctorJson);
        }
        else
        {
            Console.Out.Write(Format.Table([.. checks.Select(c => new[] { c.Passed ? "PASS" : "FAIL", c.Name, c.Detail })]));
            Console.Out.WriteLine(failed == 0 ? $"all {checks.Count} checks passed" : $"{failed} of {checks.Count} checks failed");
        }
        return failed == 0 ? 0 : 1;
    }
}
