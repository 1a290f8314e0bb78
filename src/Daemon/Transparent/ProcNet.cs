using System.Buffers.Binary;
using System.Globalization;
using System.Net;

namespace BFMig.Daemon.Transparent;

/// <summary>One TCP socket as the kernel lists it in <c>/proc/net/tcp</c> or <c>tcp6</c>.</summary>
/// <param name="Local">Local address and port.</param>
/// <param name="Remote">Remote address and port (the pre-NAT destination for a locally redirected connection).</param>
/// <param name="State">TCP state (0x0A is LISTEN, 0x01 ESTABLISHED).</param>
/// <param name="Inode">The socket's inode: what <c>/proc/PID/fd/N</c> links to as <c>socket:[INODE]</c>.</param>
/// <param name="Uid">The user that created the socket (it stays so when the descriptor is handed to another process).</param>
public sealed record TcpSocketEntry(IPEndPoint Local, IPEndPoint Remote, int State, ulong Inode, uint Uid)
{
    public const int Established = 0x01;
    public const int Listen = 0x0A;
}

/// <summary>
/// Reads the kernel's TCP socket tables and the descriptors of a process: how bfmigd learns which
/// QEMU made a redirected connection and which ports an incoming guest's QEMU listens on, from
/// what the kernel says (root-only <c>/proc/PID/fd</c>), never from what a peer or a guest claims.
/// </summary>
public static class ProcNet
{
    /// <summary>Every TCP socket of this network namespace (IPv4 and IPv6 tables).</summary>
    public static IEnumerable<TcpSocketEntry> TcpSockets(string procRoot = "/proc") =>
        Read(Path.Combine(procRoot, "net/tcp"), v6: false).Concat(Read(Path.Combine(procRoot, "net/tcp6"), v6: true));

    // Line by line: a search stops at its match, and a table swollen with TIME_WAIT entries (any
    // local user can make thousands) is never held in memory whole.
    private static IEnumerable<TcpSocketEntry> Read(string path, bool v6)
    {
        IEnumerator<string> lines;
        try
        {
            lines = File.ReadLines(path).GetEnumerator();
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            yield break;
        }
        using (lines)
        {
            if (!Next(lines))
                yield break; // not even the header line
            while (Next(lines))
            {
                if (TryParse(lines.Current, v6) is { } entry)
                    yield return entry;
            }
        }
    }

    // A table that cannot be read on counts as ended there.
    private static bool Next(IEnumerator<string> lines)
    {
        try
        {
            return lines.MoveNext();
        }
        catch (IOException)
        {
            return false;
        }
    }

    /// <summary>Parses one line of <c>/proc/net/tcp[6]</c>; null for a line that does not parse.</summary>
    public static TcpSocketEntry? TryParse(string line, bool v6)
    {
        // "  sl  local_address rem_address   st tx_queue:rx_queue tr:tm->when retrnsmt   uid  timeout inode ..."
        var f = line.Split(' ', StringSplitOptions.RemoveEmptyEntries);
        if (f.Length < 10)
            return null;
        if (ParseEndPoint(f[1], v6) is not { } local || ParseEndPoint(f[2], v6) is not { } remote)
            return null;
        if (!int.TryParse(f[3], NumberStyles.HexNumber, CultureInfo.InvariantCulture, out int state)
            || !uint.TryParse(f[7], NumberStyles.None, CultureInfo.InvariantCulture, out uint uid)
            || !ulong.TryParse(f[9], NumberStyles.None, CultureInfo.InvariantCulture, out ulong inode))
            return null;
        return new TcpSocketEntry(local, remote, state, inode, uid);
    }

    // The kernel prints each 32-bit word of the address in host byte order (little endian here).
    private static IPEndPoint? ParseEndPoint(string text, bool v6)
    {
        int colon = text.IndexOf(':');
        int hexLength = v6 ? 32 : 8;
        if (colon != hexLength || !ushort.TryParse(text.AsSpan(colon + 1), NumberStyles.HexNumber, CultureInfo.InvariantCulture, out ushort port))
            return null;
        Span<byte> bytes = stackalloc byte[hexLength / 2];
        for (int word = 0; word < bytes.Length / 4; word++)
        {
            if (!uint.TryParse(text.AsSpan(word * 8, 8), NumberStyles.HexNumber, CultureInfo.InvariantCulture, out uint value))
                return null;
            BinaryPrimitives.WriteUInt32LittleEndian(bytes[(word * 4)..], value);
        }
        var address = new IPAddress(bytes);
        if (address.IsIPv4MappedToIPv6)
            address = address.MapToIPv4();
        return new IPEndPoint(address, port);
    }

    /// <summary>True when process <paramref name="pid"/> holds the socket <paramref name="inode"/> (needs root for other users' processes).</summary>
    public static bool ProcessHoldsSocket(int pid, ulong inode, string procRoot = "/proc")
    {
        var target = $"socket:[{inode.ToString(CultureInfo.InvariantCulture)}]";
        try
        {
            foreach (var fd in Directory.EnumerateFileSystemEntries(Path.Combine(procRoot, pid.ToString(CultureInfo.InvariantCulture), "fd")))
            {
                try
                {
                    if (new FileInfo(fd).LinkTarget == target)
                        return true;
                }
                catch (Exception e) when (e is IOException or UnauthorizedAccessException)
                {
                    // The descriptor closed while we looked.
                }
            }
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            return false;
        }
        return false;
    }

    /// <summary>Equal addresses, treating an IPv4-mapped IPv6 address as its IPv4 form.</summary>
    public static bool SameAddress(IPAddress a, IPAddress b) =>
        (a.IsIPv4MappedToIPv6 ? a.MapToIPv4() : a).Equals(b.IsIPv4MappedToIPv6 ? b.MapToIPv4() : b);

    /// <summary>A wildcard listener (0.0.0.0 or ::) is reached through loopback of its family.</summary>
    public static IPEndPoint ConnectableAddress(IPEndPoint listener) =>
        listener.Address.Equals(IPAddress.Any) ? new IPEndPoint(IPAddress.Loopback, listener.Port)
        : listener.Address.Equals(IPAddress.IPv6Any) ? new IPEndPoint(IPAddress.IPv6Loopback, listener.Port)
        : listener;

    /// <summary>"tcp:ADDRESS:PORT" as bfmig-transfer's <c>--connect</c> takes it.</summary>
    public static string ConnectArgument(IPEndPoint endpoint) => Transfers.TransferManager.TcpArgument(endpoint.Address.ToString(), endpoint.Port);
}
