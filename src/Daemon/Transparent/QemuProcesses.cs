using System.Net;
using BFMig.Native.Linux;

namespace BFMig.Daemon.Transparent;

/// <summary>
/// The QEMU process of a guest, as libvirt records it (<c>/run/libvirt/qemu/NAME.pid</c>, written
/// by libvirtd as root in a root-owned directory, so neither a guest nor the QEMU user can change
/// it), and what that process's sockets are.
/// </summary>
public sealed class QemuProcesses(string pidDirectory = GuestQemu.DefaultPidDirectory, string procRoot = "/proc")
{
    /// <summary>The guest's QEMU pid, or null when libvirt has no (plain) pid file for it.</summary>
    public int? PidOf(string guestName)
    {
        if (guestName.Length == 0 || guestName.Contains('/', StringComparison.Ordinal) || guestName.StartsWith('.'))
            return null;
        return GuestQemu.ReadPid(GuestQemu.PidFile(pidDirectory, guestName), out _) is { } pid and > 1 ? pid : null;
    }

    /// <summary>
    /// Which of <paramref name="guests"/> made the outgoing connection from <paramref name="qemuSide"/>
    /// to <paramref name="originalDestination"/>: the socket's inode from the kernel's table, then
    /// the QEMU process holding it (null when none of them holds it). <c>HandOver</c>: root made the
    /// socket, so libvirtd may still be handing it to QEMU and a later look may find the owner;
    /// a socket QEMU's user made is held by its QEMU from the start, or by no guest's.
    /// </summary>
    public ((Guid Uuid, string Name)? Guest, bool HandOver) OwnerOfConnection(IPEndPoint qemuSide, IPEndPoint originalDestination,
        IEnumerable<(Guid Uuid, string Name)> guests)
    {
        var entry = ProcNet.TcpSockets(procRoot).FirstOrDefault(s =>
            s.Local.Port == qemuSide.Port && ProcNet.SameAddress(s.Local.Address, qemuSide.Address)
            && s.Remote.Port == originalDestination.Port && ProcNet.SameAddress(s.Remote.Address, originalDestination.Address)
            && s.State != TcpSocketEntry.Listen);
        if (entry is null)
            return (null, HandOver: false);
        foreach (var guest in guests)
        {
            if (PidOf(guest.Name) is { } pid && ProcNet.ProcessHoldsSocket(pid, entry.Inode, procRoot))
                return (guest, HandOver: false);
        }
        return (null, HandOver: entry.Uid == 0);
    }

    /// <summary>
    /// The listening socket on <paramref name="port"/> that the guest's own QEMU holds, or null:
    /// the only place a receiving helper may connect to in transparent mode (a peer's word about
    /// the port is checked here, so it can never point bfmigd at ssh, libvirtd or anything else).
    /// </summary>
    public IPEndPoint? GuestListener(string guestName, int port)
    {
        if (port is <= 0 or > 65535 || PidOf(guestName) is not { } pid)
            return null;
        foreach (var entry in ProcNet.TcpSockets(procRoot))
        {
            if (entry.State == TcpSocketEntry.Listen && entry.Local.Port == port && ProcNet.ProcessHoldsSocket(pid, entry.Inode, procRoot))
                return entry.Local;
        }
        return null;
    }
}
