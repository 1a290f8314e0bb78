using System.Net.Sockets;
using System.Net;
using BFMig.Native.Linux;

namespace BFMig.Transfer;

/// <summary>A socket address from the command line: <c>unix:PATH</c> or <c>tcp:HOST:PORT</c> (IPv6 in brackets).</summary>
public sealed record Endpoint(EndPoint Address, string Text)
{
    /// <summary>Parses <paramref name="text"/>; throws <see cref="FormatException"/> naming what is wrong.</summary>
    public static Endpoint Parse(string text)
    {
        if (text.StartsWith("unix:", StringComparison.Ordinal))
        {
            string path = text[5..];
            if (path.StartsWith("//", StringComparison.Ordinal)) path = path[2..];
            if (path.Length == 0) throw new FormatException($"'{text}': empty unix socket path");
            return new Endpoint(new UnixDomainSocketEndPoint(path), text);
        }
        if (text.StartsWith("tcp:", StringComparison.Ordinal))
        {
            string rest = text[4..];
            int colon = rest.LastIndexOf(':');
            if (colon <= 0 || !ushort.TryParse(rest[(colon + 1)..], out ushort port))
                throw new FormatException($"'{text}': expected tcp:HOST:PORT");
            string host = rest[..colon].Trim('[', ']');
            if (IPAddress.TryParse(host, out var ip)) return new Endpoint(new IPEndPoint(ip, port), text);
            return new Endpoint(new DnsEndPoint(host, port), text);
        }
        throw new FormatException($"'{text}': expected unix:PATH or tcp:HOST:PORT");
    }

    private Socket NewSocket() => Address switch
    {
        UnixDomainSocketEndPoint => new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified),
        IPEndPoint ip => new Socket(ip.AddressFamily, SocketType.Stream, ProtocolType.Tcp) { NoDelay = true },
        _ => new Socket(SocketType.Stream, ProtocolType.Tcp) { NoDelay = true },
    };

    /// <summary>Connects, retrying until <paramref name="timeout"/> (the far side may still be starting).</summary>
    public async Task<Socket> ConnectAsync(TimeSpan timeout, CancellationToken ct)
    {
        var deadline = DateTime.UtcNow + timeout;
        while (true)
        {
            var s = NewSocket();
            try
            {
                await s.ConnectAsync(Address, ct);
                return s;
            }
            catch (SocketException) when (DateTime.UtcNow < deadline)
            {
                s.Dispose();
                await Task.Delay(100, ct);
            }
            catch
            {
                s.Dispose();
                throw;
            }
        }
    }

    /// <summary>Listens and accepts exactly one connection within <paramref name="timeout"/>.</summary>
    public async Task<Socket> AcceptOneAsync(TimeSpan timeout, CancellationToken ct)
    {
        using var listener = NewSocket();
        if (Address is UnixDomainSocketEndPoint u && File.Exists(u.ToString())) File.Delete(u.ToString());
        if (Address is not UnixDomainSocketEndPoint) listener.SetSocketOption(SocketOptionLevel.Socket, SocketOptionName.ReuseAddress, true);
        listener.Bind(Address);
        listener.Listen(1);
        using var cts = CancellationTokenSource.CreateLinkedTokenSource(ct);
        cts.CancelAfter(timeout);
        try
        {
            return LowLatency(await listener.AcceptAsync(cts.Token));
        }
        catch (OperationCanceledException) when (!ct.IsCancellationRequested)
        {
            throw new TimeoutException($"nobody connected to {Text} within {timeout.TotalSeconds:0} s");
        }
        finally
        {
            if (Address is UnixDomainSocketEndPoint ue) File.Delete(ue.ToString());
        }
    }

    /// <summary>Adopts an inherited, already connected socket (TCP ones with Nagle off, see <see cref="LowLatency"/>).</summary>
    public static Socket FromFd(int fd) => LowLatency(new Socket(new SafeSocketHandle(fd, ownsHandle: true)));

    /// <summary>
    /// Turns Nagle off on a TCP socket (others are returned as they are). The small messages of a
    /// trip sit on the switchover's critical path: an NBD FLUSH reply, QEMU's return path, an end
    /// acknowledgement. With Nagle each waits behind the peer's delayed ACK of the data before it,
    /// up to 200 ms; the lab measured the mirror's FLUSH at STOP taking 250 ms that way.
    /// </summary>
    public static Socket LowLatency(Socket socket)
    {
        if (!UnixSockets.IsTcp(socket)) return socket;
        try
        {
            socket.NoDelay = true;
        }
        catch (SocketException)
        {
            // A socket that refuses the option (another protocol behind a TCP face) still carries the stream, only slower.
        }
        return socket;
    }
}
