using System.Net;
using System.Net.Sockets;
using BFMig.Daemon.Configuration;
using BFMig.Daemon.Logging;
using BFMig.Native.Netfilter;
using Microsoft.Extensions.Logging;

namespace BFMig.Daemon.Transparent;

/// <summary>
/// Transparent mode as one piece: the loopback listener and the redirect table that points QEMU's
/// migration connections at it, started together and stopped together (table first, so that no
/// new connection is redirected into a closing listener). When any part cannot start, the mode is
/// off, the reason is logged and shown by <c>bfmig status</c>/<c>doctor</c>, and migrations run at
/// stock cost: never a half-installed redirect.
/// </summary>
public sealed class TransparentMode : IDisposable
{
    private readonly RedirectTable? _table;
    private readonly TransparentInterceptor? _interceptor;

    private TransparentMode(string state, RedirectTable? table, TransparentInterceptor? interceptor, Task running)
    {
        State = state;
        _table = table;
        _interceptor = interceptor;
        Running = running;
    }

    /// <summary>"on: ..." or "off: why", for status and doctor.</summary>
    public string State { get; }

    /// <summary>True while the redirect is installed.</summary>
    public bool IsOn => _table is not null;

    /// <summary>Completes when the listener stopped.</summary>
    public Task Running { get; }

    /// <summary>Starts transparent mode if the options ask for it; never throws (a failure leaves it off, logged).</summary>
    public static TransparentMode Start(DaemonOptions options, uint qemuUid, ITransparentHost host, ILogger logger)
    {
        if (!options.Transparent)
            return Off(options.Peers.Count == 0 ? "no peers are configured" : "daemon:transparent = no", logger);
        MigrationPortRange ports;
        try
        {
            ports = MigrationPortRange.Read(options.QemuConf);
        }
        catch (Exception e) when (e is FormatException or IOException or UnauthorizedAccessException)
        {
            return Off($"cannot read the migration port range: {e.Message}", logger);
        }
        // The redirect would take root's connections to such a port (bfmigd's own probes and
        // helpers among them) for a migration's.
        if (options.Peers.FirstOrDefault(p => ports.Contains(p.Port)) is { } inRange)
            return Off($"peer {inRange.Name}'s BFMig port {inRange.Port} lies in the migration port range {ports} (qemu.conf migration_port_min..max)", logger);
        var peers = PeerAddresses(options, logger);
        if (peers.Count == 0)
            return Off("no peer has an address of its own that resolves", logger);
        TransparentInterceptor? interceptor = null;
        try
        {
            interceptor = new TransparentInterceptor(options.TransparentPort, peers, host, new QemuProcesses(options.QemuPidDirectory),
                TimeSpan.FromMilliseconds(options.TransparentSilenceMilliseconds), logger);
            var table = RedirectTable.Install(qemuUid, [.. peers.Keys], ports, interceptor.Port);
            var names = string.Join(", ", peers.Select(p => $"{p.Value.Name}={p.Key}"));
            DaemonLog.TransparentOn(logger, qemuUid, names, ports.ToString(), interceptor.Port);
            return new TransparentMode($"on: QEMU's connections to {names} ports {ports} go through bfmigd (127.0.0.1:{interceptor.Port})",
                table, interceptor, interceptor.RunAsync());
        }
        catch (Exception e) when (e is NftablesException or SocketException)
        {
            interceptor?.Dispose();
            return Off(e is SocketException ? $"cannot listen on 127.0.0.1:{options.TransparentPort}: {e.Message}" : e.Message, logger);
        }
    }

    private static TransparentMode Off(string reason, ILogger logger)
    {
        DaemonLog.TransparentOff(logger, reason);
        return new TransparentMode("off: " + reason, null, null, Task.CompletedTask);
    }

    /// <summary>Each peer's migration addresses (configured, else its host's addresses).</summary>
    private static Dictionary<IPAddress, PeerOptions> PeerAddresses(DaemonOptions options, ILogger logger)
    {
        var map = new Dictionary<IPAddress, PeerOptions>();
        var ambiguous = new HashSet<IPAddress>();
        foreach (var peer in options.Peers)
        {
            IEnumerable<IPAddress> addresses;
            try
            {
                addresses = peer.MigrationAddresses.Count > 0 ? peer.MigrationAddresses.Select(IPAddress.Parse) : peer.HostAddresses();
            }
            catch (SocketException e)
            {
                DaemonLog.TransparentPeerSkipped(logger, $"peer {peer.Name}", $"cannot resolve {peer.Host}: {e.Message}");
                continue;
            }
            foreach (var address in addresses)
            {
                // A loopback or wildcard address would redirect this host's own traffic.
                if (IPAddress.IsLoopback(address) || address.Equals(IPAddress.Any) || address.Equals(IPAddress.IPv6Any))
                    continue;
                var key = PeerOptions.Normalize(address);
                if (!map.TryAdd(key, peer) && map[key].Name != peer.Name)
                    ambiguous.Add(key);
            }
        }
        // Two peers at one address: a stream to it could be either's, so it is not redirected at all.
        foreach (var address in ambiguous)
        {
            DaemonLog.TransparentPeerSkipped(logger, $"address {address}", $"it belongs to more than one peer (at least {map[address].Name})");
            map.Remove(address);
        }
        return map;
    }

    /// <summary>Removes the redirect (new connections go straight to the peers), then stops the listener.</summary>
    public void Dispose()
    {
        _table?.Dispose();
        _interceptor?.Dispose();
    }
}
