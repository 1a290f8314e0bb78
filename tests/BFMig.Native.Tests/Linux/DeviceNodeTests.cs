using System.Diagnostics;
using BFMig.Native.Linux;

namespace BFMig.Native.Tests.Linux;

/// <summary>
/// DeviceNode against this machine's real file system: paths through directories or links a
/// less privileged user could change are refused, a loop device reached through root's own link
/// opens. The positive cases need root (a directory only root can write, a loop device).
/// </summary>
public sealed class DeviceNodeTests : IDisposable
{
    // A path that only root can change when the tests run as root: under /run (root's, 0755),
    // not under the checkout, which may itself sit below /tmp (1777: refused, rightly).
    private readonly string _dir = Path.Combine(Root ? "/run" : Path.GetTempPath(), "bfmig-devnode-" + Guid.NewGuid().ToString("N")[..8]);

    public DeviceNodeTests()
    {
        Directory.CreateDirectory(_dir);
        File.SetUnixFileMode(_dir, UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.UserExecute | UnixFileMode.GroupRead
            | UnixFileMode.GroupExecute | UnixFileMode.OtherRead | UnixFileMode.OtherExecute);
    }

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private static bool Root => UnixUsers.EffectiveUid == 0;

    [Fact]
    public void A_character_device_is_not_a_block_device()
    {
        var e = Assert.Throws<UnauthorizedAccessException>(() => DeviceNode.OpenBlockDeviceForReading("/dev/null", null));
        Assert.Contains("not a block device", e.Message);
    }

    [Fact]
    public void A_link_in_a_directory_anybody_may_write_is_refused()
    {
        string tmp = Directory.CreateTempSubdirectory("bfmig-devnode-").FullName;
        try
        {
            string link = Path.Combine(tmp, "disk");
            File.CreateSymbolicLink(link, "/dev/null");
            // /tmp itself (mode 1777) is where the path can be changed.
            var e = Assert.Throws<UnauthorizedAccessException>(() => DeviceNode.ResolveSafely(link));
            Assert.Contains("/tmp", e.Message);
        }
        finally
        {
            Directory.Delete(tmp, recursive: true);
        }
    }

    [Fact]
    public void A_group_writable_directory_or_a_link_of_another_user_is_refused()
    {
        if (!Root)
            return;
        string open = Path.Combine(_dir, "open");
        Directory.CreateDirectory(open);
        File.SetUnixFileMode(open, (UnixFileMode)0b111_111_101);
        File.CreateSymbolicLink(Path.Combine(open, "disk"), "/dev/null");
        Assert.Contains("someone other than root", Assert.Throws<UnauthorizedAccessException>(() => DeviceNode.ResolveSafely(Path.Combine(open, "disk"))).Message);

        string link = Path.Combine(_dir, "nobody-link");
        File.CreateSymbolicLink(link, "/dev/null");
        Run("chown", "-h", "65534:65534", link);
        Assert.Contains("not owned by root", Assert.Throws<UnauthorizedAccessException>(() => DeviceNode.ResolveSafely(link)).Message);
    }

    [Fact]
    public void A_loop_device_through_roots_own_links_opens_and_reports_its_size()
    {
        if (!Root || !File.Exists("/sbin/losetup") && !File.Exists("/usr/sbin/losetup"))
            return;
        string backing = Path.Combine(_dir, "backing.raw");
        using (var f = File.Create(backing))
            f.SetLength(4 << 20);
        string loop = Run("losetup", "--find", "--show", backing).Trim();
        string owner = Run("stat", "-c", "%u:%g", loop).Trim();
        try
        {
            string link = Path.Combine(_dir, "vg", "lv");
            Directory.CreateDirectory(Path.GetDirectoryName(link)!);
            // Relative, like LVM's /dev/VG/LV -> ../dm-N.
            File.CreateSymbolicLink(link, Path.GetRelativePath(Path.GetDirectoryName(link)!, loop));
            var (handle, resolved) = DeviceNode.OpenBlockDeviceForReading(link, null);
            using (handle)
            {
                Assert.Equal(loop, resolved);
                Assert.Equal(4L << 20, DeviceNode.Size(handle));
                Assert.True(DeviceNode.FStat(handle).IsBlockDevice);
            }

            // Handed to another user (not the QEMU user named): refused.
            Run("chown", "65534", loop);
            Assert.Contains("neither root's", Assert.Throws<UnauthorizedAccessException>(() => DeviceNode.OpenBlockDeviceForReading(link, null)).Message);
            // The QEMU user libvirt lent it to: accepted.
            DeviceNode.OpenBlockDeviceForReading(link, new NodeOwner(65534, 65534)).Handle.Dispose();
        }
        finally
        {
            Run("chown", owner, loop);
            Run("losetup", "-d", loop);
        }
    }

    private static string Run(string file, params string[] args)
    {
        var psi = new ProcessStartInfo(file) { RedirectStandardOutput = true, RedirectStandardError = true };
        foreach (string a in args)
            psi.ArgumentList.Add(a);
        using var p = Process.Start(psi)!;
        string stdout = p.StandardOutput.ReadToEnd();
        string stderr = p.StandardError.ReadToEnd();
        p.WaitForExit();
        Assert.True(p.ExitCode == 0, $"{file} {string.Join(' ', args)}: {stderr}");
        return stdout;
    }
}
