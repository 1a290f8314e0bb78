using System.Globalization;
using System.Net;
using System.Net.Sockets;
using System.Text;
using BFMig.Native.Netfilter;

namespace BFMig.Daemon.Transparent;

/// <summary>
/// BFMig's own nftables table, <c>inet bfmig</c>: redirects new TCP connections of the QEMU user
/// and of root to configured peers' migration ports to bfmigd's loopback listener, and nothing
/// else (no other user, no other address, no other port: libvirtd's RPC, ssh, the peers' BFMig
/// port and guests' own traffic pass untouched). Root is needed because libvirtd opens the memory
/// stream's connection itself and hands it to QEMU (<c>getfd</c>, <c>migrate fd:</c>; only the
/// NBD mirror and multifd connect from QEMU); the interceptor accelerates only connections a
/// running guest's QEMU holds and carries every other one byte for byte. bfmigd's own onward
/// connections carry <see cref="BypassMark"/>, which the rule skips, so they never loop back. The table is created with <c>flags owner</c> on a libnftables
/// context this object keeps open, so the kernel removes it the moment bfmigd exits, is killed or
/// crashes: new migrations then go straight to the peer at stock cost (fail-open by construction).
/// </summary>
public sealed class RedirectTable : IDisposable
{
    /// <summary>The table's name in family <c>inet</c>.</summary>
    public const string TableName = "bfmig";

    /// <summary>The socket mark (SO_MARK) of bfmigd's own connections to a peer's migration port: never redirected.</summary>
    public const uint BypassMark = 0x62666d67; // "bfmg"

    private readonly NftContext _nft;

    private RedirectTable(NftContext nft) => _nft = nft;

    /// <summary>
    /// Installs the table. Throws <see cref="NftablesException"/> with nft's reason (no nf_tables in
    /// the kernel, no CAP_NET_ADMIN, a table of that name owned by another process).
    /// </summary>
    public static RedirectTable Install(uint qemuUid, IReadOnlyCollection<IPAddress> peerAddresses, MigrationPortRange ports, int listenPort)
    {
        var nft = NftContext.Open();
        try
        {
            nft.Run(Ruleset(qemuUid, peerAddresses, ports, listenPort));
            return new RedirectTable(nft);
        }
        catch
        {
            nft.Dispose();
            throw;
        }
    }

    /// <summary>The nft commands that create the table (one transaction). Public for tests and <c>bfmig doctor</c>.</summary>
    public static string Ruleset(uint qemuUid, IReadOnlyCollection<IPAddress> peerAddresses, MigrationPortRange ports, int listenPort)
    {
        var v4 = peerAddresses.Where(a => a.AddressFamily == AddressFamily.InterNetwork).Select(a => a.ToString()).Distinct().ToList();
        var v6 = peerAddresses.Where(a => a.AddressFamily == AddressFamily.InterNetworkV6).Select(a => a.ToString()).Distinct().ToList();
        var uids = qemuUid == 0 ? "0" : $"{{ 0, {qemuUid.ToString(CultureInfo.InvariantCulture)} }}";
        var skip = $"meta mark != 0x{BypassMark:x8}";
        var port = listenPort.ToString(CultureInfo.InvariantCulture);
        var text = new StringBuilder();
        text.Append(CultureInfo.InvariantCulture, $"add table inet {TableName} {{ flags owner; }}\n");
        // dstnat priority in the output hook: before routing decides, as a redirect must be.
        text.Append(CultureInfo.InvariantCulture, $"add chain inet {TableName} output {{ type nat hook output priority -100; policy accept; }}\n");
        if (v4.Count > 0)
            text.Append(CultureInfo.InvariantCulture,
                $"add rule inet {TableName} output {skip} meta skuid {uids} ip daddr {{ {string.Join(", ", v4)} }} tcp dport {ports} counter redirect to :{port}\n");
        if (v6.Count > 0)
            text.Append(CultureInfo.InvariantCulture,
                $"add rule inet {TableName} output {skip} meta skuid {uids} ip6 daddr {{ {string.Join(", ", v6)} }} tcp dport {ports} counter redirect to :{port}\n");
        return text.ToString();
    }

    /// <summary>The table as the kernel has it now (for logs and checks).</summary>
    public string List() => _nft.Run($"list table inet {TableName}");

    /// <summary>Removes the table (closing the context is enough: the kernel drops owned tables with their socket).</summary>
    public void Dispose() => _nft.Dispose();
}
