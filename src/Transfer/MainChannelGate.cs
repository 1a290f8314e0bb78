using System.Globalization;
using System.Net;
using System.Net.Sockets;

namespace BFMig.Transfer;

/// <summary>
/// Keeps a multifd channel's connection to the destination QEMU behind its main channel's.
/// QEMU 7.2 takes the first connection on its incoming socket for the main migration stream and
/// every later one for a multifd channel (from 8.0 it peeks at each channel's magic instead).
/// Through BFMig each channel runs in its own helper pair, so they reach the destination in any
/// order; a multifd channel that came first would be read as the main stream ("received packet
/// magic 5145564d expected 11223344") and fail the migration. So a multifd channel's receiver
/// waits until the kernel lists a connection to QEMU's listener: the main channel's, queued
/// before it (a listener accepts in arrival order, and the main receiver never waits).
/// </summary>
public static class MainChannelGate
{
    private static readonly TimeSpan Poll = TimeSpan.FromMilliseconds(20);

    /// <summary>
    /// How long a multifd channel waits for its main channel: the main one's helpers connect as
    /// soon as their own handshake is done, so this is the helper's connect timeout.
    /// </summary>
    public static readonly TimeSpan DefaultTimeout = TimeSpan.FromSeconds(30);

    /// <summary>
    /// Waits until QEMU's listener at <paramref name="local"/> has at least one connection
    /// (accepted or queued); throws <see cref="TimeoutException"/> after <paramref name="timeout"/>.
    /// </summary>
    public static async Task WaitAsync(Endpoint local, TimeSpan timeout, CancellationToken ct, string procRoot = "/proc")
    {
        var deadline = DateTime.UtcNow + timeout;
        while (Connections(local.Address, procRoot) == 0)
        {
            if (DateTime.UtcNow >= deadline)
                throw new TimeoutException($"multifd channel: the main migration channel did not connect to {local.Text} within {timeout.TotalSeconds:0} s");
            await Task.Delay(Poll, ct);
        }
    }

    /// <summary>Connections the kernel lists for the listener at <paramref name="address"/> in this network namespace.</summary>
    public static int Connections(EndPoint address, string procRoot = "/proc") => address switch
    {
        UnixDomainSocketEndPoint unix => UnixConnections(ReadLines(Path.Combine(procRoot, "net/unix")), unix.ToString()),
        IPEndPoint ip => TcpConnections(ReadLines(Path.Combine(procRoot, "net/tcp")).Concat(ReadLines(Path.Combine(procRoot, "net/tcp6"))), ip.Port),
        _ => 0,
    };

    /// <summary>
    /// Lines of <c>/proc/net/unix</c> (<c>Num RefCount Protocol Flags Type St Inode Path</c>) that
    /// are connections to the listener bound at <paramref name="path"/>: an accepted or still
    /// queued server-side socket carries the listener's path; the listener itself is flagged
    /// <c>__SO_ACCEPTCON</c> (0x10000), a client socket has no path.
    /// </summary>
    public static int UnixConnections(IEnumerable<string> lines, string path)
    {
        const uint AcceptCon = 0x10000;
        int n = 0;
        foreach (var line in lines)
        {
            var f = line.Split(' ', 8, StringSplitOptions.RemoveEmptyEntries);
            if (f.Length < 8 || f[7] != path
                || !uint.TryParse(f[3], NumberStyles.HexNumber, CultureInfo.InvariantCulture, out uint flags) || (flags & AcceptCon) != 0)
                continue;
            n++;
        }
        return n;
    }

    /// <summary>
    /// Lines of <c>/proc/net/tcp[6]</c> that are established connections whose local port is
    /// <paramref name="port"/>: the server side of connections to QEMU's incoming port (the
    /// connecting side has that port as its remote one).
    /// </summary>
    public static int TcpConnections(IEnumerable<string> lines, int port)
    {
        const int Established = 0x01;
        int n = 0;
        foreach (var line in lines)
        {
            var f = line.Split(' ', StringSplitOptions.RemoveEmptyEntries);
            if (f.Length < 4)
                continue;
            int colon = f[1].LastIndexOf(':');
            if (colon < 0 || !int.TryParse(f[1].AsSpan(colon + 1), NumberStyles.HexNumber, CultureInfo.InvariantCulture, out int localPort)
                || !int.TryParse(f[3], NumberStyles.HexNumber, CultureInfo.InvariantCulture, out int state))
                continue;
            if (localPort == port && state == Established)
                n++;
        }
        return n;
    }

    private static IEnumerable<string> ReadLines(string path)
    {
        try
        {
            return File.ReadAllLines(path).Skip(1);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            return [];
        }
    }
}
