using System.Buffers.Binary;
using System.Net;
using System.Net.Sockets;
using System.Runtime.InteropServices;

namespace BFMig.Native.Linux;

/// <summary>
/// How many bytes written on a local TCP connection the other end has not read yet: its receive
/// queue, asked of the kernel through NETLINK_SOCK_DIAG (what <c>ss</c> shows as Recv-Q) by the
/// connection's exact four-tuple, plus this end's bytes not sent yet (SIOCOUTQNSD). Only a peer on
/// this host (the same network namespace) can be found. Needs no privilege. One netlink socket per
/// instance; not thread-safe.
/// </summary>
/// <remarks>
/// Why: a helper that writes into a local QEMU's TCP socket sees a write complete as soon as the
/// bytes sit in QEMU's receive queue, which the kernel grows up to <c>tcp_rmem</c>'s maximum (32
/// MiB on the lab's hosts). Those bytes are invisible to the writer and must all be loaded before
/// QEMU serves anything else, the mirror's FLUSH at the switchover included.
/// </remarks>
public sealed class TcpPeerQueue : IDisposable
{
    private const int AfNetlink = 16;
    private const int SockDgram = 2;
    private const int SockCloexec = 0x80000;
    private const int NetlinkSockDiag = 4;
    private const ushort SockDiagByFamily = 20;
    private const ushort NlmFRequest = 1;
    private const ushort NlmsgError = 2;
    private const int IpProtoTcp = 6;
    private const int RequestLength = 16 + 56;
    // nlmsghdr (16), then inet_diag_msg: family, state, timer, retrans (4), sockid (48), expires (4), rqueue, wqueue.
    private const int StateOffset = 16 + 1;
    private const int SockIdOffset = 16 + 4;
    private const int RqueueOffset = 16 + 4 + 48 + 4;
    // inet_diag_sockid in the request: ports and addresses, 36 bytes, compared with the reply's.
    private const int RequestSockIdOffset = 16 + 8;
    private const int SockIdCompared = 4 + 32;
    private const byte TcpListen = 10;

    private readonly Socket _socket;
    private readonly byte[] _request;
    private readonly byte[] _reply = new byte[512];
    private int _fd;
    private uint _sequence;

    private TcpPeerQueue(int fd, Socket socket, IPEndPoint local, IPEndPoint remote)
    {
        _fd = fd;
        _socket = socket;
        _request = Request(remote, local);
    }

    // An exact lookup (no NLM_F_DUMP) of the TCP socket bound to source and connected to destination.
    private static byte[] Request(IPEndPoint source, IPEndPoint destination)
    {
        var r = new byte[RequestLength];
        BinaryPrimitives.WriteUInt32LittleEndian(r, RequestLength);
        BinaryPrimitives.WriteUInt16LittleEndian(r.AsSpan(4), SockDiagByFamily);
        BinaryPrimitives.WriteUInt16LittleEndian(r.AsSpan(6), NlmFRequest);
        // inet_diag_req_v2: family, protocol, ext, pad, states, then inet_diag_sockid.
        r[16] = (byte)(source.AddressFamily == AddressFamily.InterNetworkV6 ? 10 : 2);
        r[17] = IpProtoTcp;
        BinaryPrimitives.WriteUInt32LittleEndian(r.AsSpan(20), uint.MaxValue); // every state
        BinaryPrimitives.WriteUInt16BigEndian(r.AsSpan(24), (ushort)source.Port);
        BinaryPrimitives.WriteUInt16BigEndian(r.AsSpan(26), (ushort)destination.Port);
        source.Address.GetAddressBytes().CopyTo(r, 28);
        destination.Address.GetAddressBytes().CopyTo(r, 44);
        BinaryPrimitives.WriteUInt64LittleEndian(r.AsSpan(64), ulong.MaxValue); // INET_DIAG_NOCOOKIE
        return r;
    }

    /// <summary>A query for the peer of <paramref name="socket"/>; null when it is not a connected TCP socket or netlink is unavailable.</summary>
    public static TcpPeerQueue? For(Socket socket)
    {
        if (!UnixSockets.IsTcp(socket) || socket.LocalEndPoint is not IPEndPoint local || socket.RemoteEndPoint is not IPEndPoint remote)
            return null;
        // Both ends in one family: an IPv4-mapped IPv6 pair is looked up as IPv6.
        if (local.AddressFamily != remote.AddressFamily) return null;
        int fd = Interop.Socket.Open(AfNetlink, SockDgram | SockCloexec, NetlinkSockDiag);
        return fd < 0 ? null : new TcpPeerQueue(fd, socket, local, remote);
    }

    /// <summary>
    /// Bytes written on this connection that the peer has not read yet: its receive queue plus
    /// what this end has not sent yet (held back while the peer's window is closed; bytes sent and
    /// not yet acknowledged are in the peer's queue already and are not counted twice). Null when
    /// the kernel does not know the peer (not on this host, closed) or a query failed.
    /// </summary>
    public unsafe long? Unread()
    {
        if (_fd < 0) throw new ObjectDisposedException(nameof(TcpPeerQueue));
        if (QueryPeer() is not { } received) return null;
        int unsent = 0;
        if (Interop.Socket.Ioctl(_socket.Handle, Interop.Socket.SiocOutqNsd, &unsent) != 0 || unsent < 0) return null;
        return received + unsent;
    }

    private unsafe long? QueryPeer()
    {
        uint sequence = ++_sequence;
        BinaryPrimitives.WriteUInt32LittleEndian(_request.AsSpan(8), sequence);
        fixed (byte* r = _request)
        {
            if (Interop.Socket.Send(_fd, r, RequestLength, 0) != RequestLength) return null;
        }
        // The kernel answers a sock_diag request inside send(), so the reply is already queued.
        while (true)
        {
            nint n;
            fixed (byte* reply = _reply)
                n = Interop.Socket.Recv(_fd, reply, (nuint)_reply.Length, Interop.Socket.MsgDontwait);
            if (n < 16) return null;
            var r = _reply.AsSpan(0, (int)n);
            if (BinaryPrimitives.ReadUInt32LittleEndian(r[8..]) != sequence) continue; // an answer to an older query
            if (BinaryPrimitives.ReadUInt16LittleEndian(r[4..]) == NlmsgError || n < RqueueOffset + 4) return null;
            // Without a connected socket of that four-tuple the kernel answers for a listener on
            // the port (whose "queue" is its accept backlog): that is no answer about the peer.
            if (r[StateOffset] == TcpListen
                || !r.Slice(SockIdOffset, SockIdCompared).SequenceEqual(_request.AsSpan(RequestSockIdOffset, SockIdCompared)))
                return null;
            return BinaryPrimitives.ReadUInt32LittleEndian(r[RqueueOffset..]);
        }
    }

    public void Dispose()
    {
        if (_fd < 0) return;
        Interop.Libc.Close(_fd);
        _fd = -1;
    }
}
