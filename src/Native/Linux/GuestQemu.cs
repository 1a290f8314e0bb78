using System.Globalization;
using System.Net.Sockets;

namespace BFMig.Native.Linux;

/// <summary>
/// Whether the process at the other end of a unix socket is the QEMU of a given guest: its
/// SO_PEERCRED pid must be the one libvirt recorded in <c>PIDDIR/GUEST.pid</c>
/// (<c>/run/libvirt/qemu</c>, written by libvirtd as root in a directory only root can write).
/// Group membership is not enough: every guest's QEMU, and any other member of the QEMU group,
/// can reach the socket directories, but only this guest's QEMU may move this guest's memory.
/// A root process passes too: libvirtd itself connects the migration stream of a unix
/// <c>--migrateuri</c> and hands QEMU the descriptor (seen in the lab, libvirt 9.0), and root can
/// read any guest's memory anyway.
/// </summary>
public static class GuestQemu
{
    /// <summary>libvirt's (system instance) directory of QEMU pid files.</summary>
    public const string DefaultPidDirectory = "/run/libvirt/qemu";

    /// <summary>The pid file of <paramref name="guest"/> under <paramref name="pidDirectory"/>.</summary>
    public static string PidFile(string pidDirectory, string guest) => Path.Combine(pidDirectory, guest + ".pid");

    /// <summary>Null when the peer of <paramref name="socket"/> is the process named by <paramref name="pidFile"/>; otherwise why not.</summary>
    public static string? Check(Socket socket, string pidFile)
    {
        int peer;
        try
        {
            (peer, uint uid, _) = UnixSockets.GetPeerCredentials(socket);
            if (uid == 0)
                return null;
        }
        catch (Exception e) when (e is SocketException or ObjectDisposedException)
        {
            return $"cannot read the peer's credentials: {e.Message}";
        }
        int? qemu = ReadPid(pidFile, out var why);
        if (qemu is null)
            return $"process {peer} refused: {why}";
        return qemu == peer ? null : $"process {peer} is not the guest's QEMU (pid {qemu}, {pidFile})";
    }

    /// <summary>The pid libvirt recorded in <paramref name="pidFile"/>, or null (and why) when it is missing or not a plain pid file.</summary>
    public static int? ReadPid(string pidFile, out string why)
    {
        try
        {
            var info = new FileInfo(pidFile);
            // Only libvirt writes there; a link (or anything larger than a pid) was not written by it.
            if (!info.Exists || info.LinkTarget is not null || info.Length > 32)
            {
                why = $"{pidFile} is missing or not a plain pid file";
                return null;
            }
            if (int.TryParse(File.ReadAllText(pidFile).Trim(), NumberStyles.None, CultureInfo.InvariantCulture, out int pid) && pid > 0)
            {
                why = "";
                return pid;
            }
            why = $"{pidFile} holds no pid";
            return null;
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            why = $"cannot read {pidFile}: {e.Message}";
            return null;
        }
    }
}
