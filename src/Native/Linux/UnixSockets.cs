using System.Buffers.Binary;
using System.Net;
using System.Net.Sockets;
using System.Runtime.InteropServices;

namespace BFMig.Native.Linux;

/// <summary>Socket operations .NET does not offer: the pre-NAT destination of a redirected connection, and fd passing.</summary>
public static class UnixSockets
{
    /// <summary>True for a TCP socket (a stream over IPv4 or IPv6): the one test of which sockets take TCP-only options and queries.</summary>
    public static bool IsTcp(Socket socket) =>
        socket.SocketType == SocketType.Stream && socket.AddressFamily is (AddressFamily.InterNetwork or AddressFamily.InterNetworkV6);

    /// <summary>
    /// True once the other end of a stream socket has closed or shut down its sending side, or
    /// the socket failed (POLLRDHUP, POLLHUP, POLLERR), whether or not bytes it sent before are
    /// still unread here: unlike a zero-byte read, it does not wait for the reader to get there.
    /// Never blocks.
    /// </summary>
    /// <exception cref="ObjectDisposedException">The socket is closed already.</exception>
    public static unsafe bool PeerHungUp(Socket socket)
    {
        ArgumentNullException.ThrowIfNull(socket);
        // The reference keeps the descriptor from being closed (and its number reused) mid-poll;
        // a socket already closed throws ObjectDisposedException here.
        var handle = socket.SafeHandle;
        bool referenced = false;
        try
        {
            handle.DangerousAddRef(ref referenced);
            var fd = new Interop.Libc.PollFd { Fd = (int)handle.DangerousGetHandle(), Events = Interop.Libc.PollRdHup };
            int rc = Interop.Libc.Poll(&fd, 1, 0);
            return rc > 0 && (fd.Revents & (Interop.Libc.PollRdHup | Interop.Libc.PollHup | Interop.Libc.PollErr)) != 0;
        }
        finally
        {
            if (referenced) handle.DangerousRelease();
        }
    }

    /// <summary>At most this many descriptors travel in one message (SCM_MAX_FD is 253).</summary>
    public const int MaxFds = 253;

    /// <summary>
    /// The destination a connection had before an nftables/iptables <c>redirect</c> rewrote it
    /// (getsockopt SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST, read from conntrack). A tracked
    /// connection that was not rewritten reports its real destination; a socket without a
    /// conntrack entry throws (ENOENT).
    /// </summary>
    public static unsafe IPEndPoint GetOriginalDestination(Socket socket)
    {
        ArgumentNullException.ThrowIfNull(socket);
        bool v6 = socket.AddressFamily == AddressFamily.InterNetworkV6;
        byte* address = stackalloc byte[28];
        uint length = v6 ? 28u : 16u;
        int rc = Interop.Socket.GetSockOpt(socket.Handle, v6 ? Interop.Socket.SolIpv6 : Interop.Socket.SolIp,
            Interop.Socket.SoOriginalDst, address, &length);
        if (rc != 0)
        {
            int errno = Marshal.GetLastPInvokeError();
            throw new SocketException(errno, $"SO_ORIGINAL_DST failed: {Marshal.GetPInvokeErrorMessage(errno)} (errno {errno}; was the connection redirected?)");
        }
        var bytes = new ReadOnlySpan<byte>(address, (int)length);
        ushort port = BinaryPrimitives.ReadUInt16BigEndian(bytes[2..]);
        return v6
            ? new IPEndPoint(new IPAddress(bytes.Slice(8, 16), BinaryPrimitives.ReadUInt32LittleEndian(bytes[24..])), port)
            : new IPEndPoint(new IPAddress(bytes.Slice(4, 4)), port);
    }

    /// <summary>
    /// The process at the other end of a connected AF_UNIX socket (SO_PEERCRED): for an accepted
    /// connection the one that called connect(2), for a connecting socket the one that called
    /// listen(2). Fixed by the kernel at that moment; passing the descriptor on does not change it.
    /// </summary>
    public static unsafe (int Pid, uint Uid, uint Gid) GetPeerCredentials(Socket socket)
    {
        ArgumentNullException.ThrowIfNull(socket);
        int* cred = stackalloc int[3];
        uint length = 12;
        if (Interop.Socket.GetSockOpt(socket.Handle, Interop.Socket.SolSocket, Interop.Socket.SoPeerCred, cred, &length) != 0)
        {
            int errno = Marshal.GetLastPInvokeError();
            throw new SocketException(errno, $"SO_PEERCRED failed: {Marshal.GetPInvokeErrorMessage(errno)} (errno {errno})");
        }
        return (cred[0], (uint)cred[1], (uint)cred[2]);
    }

    /// <summary>
    /// Sends <paramref name="data"/> (at least one byte) with <paramref name="fds"/> attached as
    /// SCM_RIGHTS over a connected AF_UNIX socket. The receiver gets duplicates; ours stay open.
    /// </summary>
    public static unsafe int SendWithFds(Socket socket, ReadOnlySpan<byte> data, ReadOnlySpan<int> fds)
    {
        ArgumentNullException.ThrowIfNull(socket);
        if (data.IsEmpty)
        {
            throw new ArgumentException("at least one data byte must accompany the descriptors", nameof(data));
        }
        if (fds.Length > MaxFds)
        {
            throw new ArgumentException($"{fds.Length} descriptors exceed the kernel's limit of {MaxFds} per message", nameof(fds));
        }
        int controlLength = fds.IsEmpty ? 0 : Interop.Socket.CmsgSpace(fds.Length * sizeof(int));
        byte* control = stackalloc byte[Math.Max(controlLength, 1)];
        new Span<byte>(control, controlLength).Clear();
        if (!fds.IsEmpty)
        {
            var header = (Interop.Socket.CmsgHdr*)control;
            header->Length = (nuint)Interop.Socket.CmsgLen(fds.Length * sizeof(int));
            header->Level = Interop.Socket.SolSocket;
            header->Type = Interop.Socket.ScmRights;
            fds.CopyTo(new Span<int>(control + Interop.Socket.CmsgAlign(sizeof(Interop.Socket.CmsgHdr)), fds.Length));
        }
        fixed (byte* d = data)
        {
            var iov = new Interop.SdJournal.IoVec { Base = d, Length = (nuint)data.Length };
            var message = new Interop.Socket.MsgHdr
            {
                Iov = &iov,
                IovLength = 1,
                Control = controlLength == 0 ? null : control,
                ControlLength = (nuint)controlLength,
            };
            while (true)
            {
                nint sent = Interop.Socket.SendMsg(socket.Handle, &message, Interop.Socket.MsgNosignal);
                if (sent >= 0)
                {
                    return (int)sent;
                }
                int errno = Marshal.GetLastPInvokeError();
                if (errno == Interop.Socket.EIntr)
                {
                    continue;
                }
                if (errno == Interop.Socket.EAgain && socket.Poll(TimeSpan.FromSeconds(30), SelectMode.SelectWrite))
                {
                    continue;
                }
                throw new SocketException(errno, $"sendmsg with {fds.Length} descriptors failed: {Marshal.GetPInvokeErrorMessage(errno)} (errno {errno})");
            }
        }
    }

    /// <summary>
    /// Receives data and up to <paramref name="fds"/>.Length descriptors (close-on-exec) sent with
    /// <see cref="SendWithFds"/>. Waits at most <paramref name="timeout"/>. Returns the byte count
    /// (0 = peer closed) and how many descriptors arrived; the caller owns and must close them.
    /// If the sender attached more descriptors than fit, the extra ones are closed by the kernel
    /// and this throws, since the message is then incomplete.
    /// </summary>
    public static unsafe (int Bytes, int FdCount) ReceiveWithFds(Socket socket, Span<byte> buffer, Span<int> fds, TimeSpan timeout)
    {
        ArgumentNullException.ThrowIfNull(socket);
        if (fds.Length > MaxFds)
        {
            throw new ArgumentException($"at most {MaxFds} descriptors can arrive in one message", nameof(fds));
        }
        int controlLength = Interop.Socket.CmsgSpace(Math.Max(fds.Length, 1) * sizeof(int));
        byte* control = stackalloc byte[controlLength];
        DateTime deadline = DateTime.UtcNow + timeout;
        fixed (byte* b = buffer)
        {
            var iov = new Interop.SdJournal.IoVec { Base = b, Length = (nuint)buffer.Length };
            while (true)
            {
                new Span<byte>(control, controlLength).Clear();
                var message = new Interop.Socket.MsgHdr { Iov = &iov, IovLength = 1, Control = control, ControlLength = (nuint)controlLength };
                nint received = Interop.Socket.RecvMsg(socket.Handle, &message, Interop.Socket.MsgCmsgCloexec | Interop.Socket.MsgDontwait);
                if (received >= 0)
                {
                    int count = CollectFds(&message, fds);
                    if ((message.Flags & Interop.Socket.MsgCtrunc) != 0)
                    {
                        CloseAll(fds[..count]);
                        throw new IOException($"the sender attached more than {fds.Length} descriptors; the message was truncated and its descriptors closed");
                    }
                    return ((int)received, count);
                }
                int errno = Marshal.GetLastPInvokeError();
                if (errno == Interop.Socket.EIntr)
                {
                    continue;
                }
                TimeSpan left = deadline - DateTime.UtcNow;
                // Non-blocking receive plus poll: a blocking socket would otherwise ignore the timeout.
                if (errno == Interop.Socket.EAgain && left > TimeSpan.Zero && socket.Poll(left, SelectMode.SelectRead))
                {
                    continue;
                }
                if (errno == Interop.Socket.EAgain)
                {
                    throw new TimeoutException($"no message with descriptors arrived within {timeout}");
                }
                throw new SocketException(errno, $"recvmsg failed: {Marshal.GetPInvokeErrorMessage(errno)} (errno {errno})");
            }
        }
    }

    private static unsafe int CollectFds(Interop.Socket.MsgHdr* message, Span<int> fds)
    {
        int count = 0;
        byte* end = (byte*)message->Control + (int)message->ControlLength;
        byte* p = (byte*)message->Control;
        int headerSize = Interop.Socket.CmsgAlign(sizeof(Interop.Socket.CmsgHdr));
        while (p != null && p + sizeof(Interop.Socket.CmsgHdr) <= end)
        {
            var header = (Interop.Socket.CmsgHdr*)p;
            if ((int)header->Length < sizeof(Interop.Socket.CmsgHdr))
            {
                break;
            }
            if (header->Level == Interop.Socket.SolSocket && header->Type == Interop.Socket.ScmRights)
            {
                int n = ((int)header->Length - headerSize) / sizeof(int);
                int* data = (int*)(p + headerSize);
                for (int i = 0; i < n; i++)
                {
                    if (count < fds.Length)
                    {
                        fds[count++] = data[i];
                    }
                    else
                    {
                        Interop.Libc.Close(data[i]);
                    }
                }
            }
            p += Interop.Socket.CmsgAlign((int)header->Length);
        }
        return count;
    }

    private static void CloseAll(ReadOnlySpan<int> fds)
    {
        foreach (int fd in fds)
        {
            Interop.Libc.Close(fd);
        }
    }
}
