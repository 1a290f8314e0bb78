using System.Runtime.InteropServices;
using socklen_t = uint;

namespace BFMig.Native;

internal static partial class Interop
{
    /// <summary>Socket calls .NET does not expose: SO_ORIGINAL_DST and SCM_RIGHTS.</summary>
    internal static partial class Socket
    {
        internal const int SolSocket = 1;
        internal const int SolIp = 0;
        internal const int SolIpv6 = 41;
        internal const int ScmRights = 1;
        /// <summary>SO_ORIGINAL_DST (linux/netfilter_ipv4.h) and IP6T_SO_ORIGINAL_DST share the value 80.</summary>
        internal const int SoOriginalDst = 80;
        /// <summary>SO_PEERCRED (asm-generic/socket.h): struct ucred of the process that connected (or listened).</summary>
        internal const int SoPeerCred = 17;
        internal const int MsgCtrunc = 0x8;
        internal const int MsgDontwait = 0x40;
        internal const int MsgNosignal = 0x4000;
        internal const int MsgCmsgCloexec = 0x40000000;
        internal const int EAgain = 11;
        internal const int EIntr = 4;

        /// <summary>struct msghdr (x86-64/aarch64 glibc).</summary>
        [StructLayout(LayoutKind.Sequential)]
        internal unsafe struct MsgHdr
        {
            public void* Name;
            public socklen_t NameLength;
            public SdJournal.IoVec* Iov;
            public nuint IovLength;
            public void* Control;
            public nuint ControlLength;
            public int Flags;
        }

        /// <summary>struct cmsghdr: size_t len; int level; int type; then data aligned to size_t.</summary>
        [StructLayout(LayoutKind.Sequential)]
        internal struct CmsgHdr
        {
            public nuint Length;
            public int Level;
            public int Type;
        }

        internal static unsafe int CmsgAlign(int length) => (length + sizeof(nuint) - 1) & ~(sizeof(nuint) - 1);

        internal static unsafe int CmsgSpace(int dataLength) => CmsgAlign(sizeof(CmsgHdr)) + CmsgAlign(dataLength);

        internal static unsafe int CmsgLen(int dataLength) => CmsgAlign(sizeof(CmsgHdr)) + dataLength;

        [LibraryImport(Libc.Library, EntryPoint = "getsockopt", SetLastError = true)]
        internal static unsafe partial int GetSockOpt(nint fd, int level, int name, void* value, socklen_t* length);

        /// <summary>SIOCOUTQNSD (linux/sockios.h): bytes in a TCP socket's send queue not yet sent.</summary>
        internal const nuint SiocOutqNsd = 0x894B;

        [LibraryImport(Libc.Library, EntryPoint = "ioctl", SetLastError = true)]
        internal static unsafe partial int Ioctl(nint fd, nuint request, int* value);

        [LibraryImport(Libc.Library, EntryPoint = "socket", SetLastError = true)]
        internal static partial int Open(int domain, int type, int protocol);

        [LibraryImport(Libc.Library, EntryPoint = "send", SetLastError = true)]
        internal static unsafe partial nint Send(int fd, void* buffer, nuint length, int flags);

        [LibraryImport(Libc.Library, EntryPoint = "recv", SetLastError = true)]
        internal static unsafe partial nint Recv(int fd, void* buffer, nuint length, int flags);

        [LibraryImport(Libc.Library, EntryPoint = "sendmsg", SetLastError = true)]
        internal static unsafe partial nint SendMsg(nint fd, MsgHdr* message, int flags);

        [LibraryImport(Libc.Library, EntryPoint = "recvmsg", SetLastError = true)]
        internal static unsafe partial nint RecvMsg(nint fd, MsgHdr* message, int flags);
    }
}
