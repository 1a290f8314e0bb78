using System.Diagnostics;
using BFMig.Transfer.Disk;
using Xunit;

namespace BFMig.Transfer.Tests.Nbd;

/// <summary>An image restored in place with its old size and mtime is not the image a map describes.</summary>
public sealed class ImageFingerprintTests
{
    [Fact]
    public async Task A_raw_image_restored_in_place_with_size_and_mtime_kept_invalidates_the_map()
    {
        using var dir = TestEnv.CreateTempDir();
        string image = dir.File("guest.raw");
        var left = new byte[4 << 20];
        Random.Shared.NextBytes(left);
        await File.WriteAllBytesAsync(image, left);
        var mtime = File.GetLastWriteTimeUtc(image);
        var identity = DiskImageIdentity.Capture(image, "raw");
        string path = dir.File("guest.map");
        new DiskBlockMap((ulong)left.Length, identity: identity).Save(path);
        Assert.NotNull(DiskBlockMap.TryLoadValid(path, DiskImageIdentity.Capture(image, "raw")));

        // "Restore a backup": other content written into the same file (same inode, same size), mtime put back.
        var backup = new byte[left.Length];
        Random.Shared.NextBytes(backup);
        using (var f = new FileStream(image, FileMode.Open, FileAccess.Write))
            f.Write(backup);
        File.SetLastWriteTimeUtc(image, mtime);
        var now = DiskImageIdentity.Capture(image, "raw");
        Assert.Equal((identity.Inode, identity.Size, identity.MtimeTicks), (now.Inode, now.Size, now.MtimeTicks));
        Assert.NotEqual(identity.Fingerprint, now.Fingerprint);
        Assert.Null(DiskBlockMap.TryLoadValid(path, now));
    }

    [Fact]
    public async Task A_qcow2_backup_of_the_same_size_restored_in_place_is_seen()
    {
        if (!Require.Available(File.Exists("/usr/bin/qemu-io") && File.Exists("/usr/bin/qemu-img"), "qemu-img and qemu-io (qemu-utils)")) return;
        using var dir = TestEnv.CreateTempDir();
        string image = dir.File("guest.qcow2");
        string backup = dir.File("backup.qcow2");
        // Same allocation count, so the same file size; different places (L1/L2) and the same data pattern.
        await Run("qemu-img", "create", "-f", "qcow2", image, "2G");
        await Run("qemu-io", "-f", "qcow2", "-c", "write -P 0xab 0 64k", "-c", "write -P 0xab 1536M 64k", image);
        await Run("qemu-img", "create", "-f", "qcow2", backup, "2G");
        await Run("qemu-io", "-f", "qcow2", "-c", "write -P 0xab 0 64k", "-c", "write -P 0xab 1024M 64k", backup);
        Assert.Equal(new FileInfo(image).Length, new FileInfo(backup).Length);
        var before = DiskImageIdentity.Capture(image, "qcow2");
        var mtime = File.GetLastWriteTimeUtc(image);
        using (var target = new FileStream(image, FileMode.Open, FileAccess.Write))
            target.Write(await File.ReadAllBytesAsync(backup));
        File.SetLastWriteTimeUtc(image, mtime);
        var after = DiskImageIdentity.Capture(image, "qcow2");
        Assert.Equal((before.Inode, before.Size, before.MtimeTicks), (after.Inode, after.Size, after.MtimeTicks));
        Assert.NotEqual(before.Fingerprint, after.Fingerprint);
        // Captured twice without a change: the same identity (the fingerprint is deterministic).
        Assert.Equal(after, DiskImageIdentity.Capture(image, "qcow2"));
    }

    [Fact]
    public void The_fingerprint_survives_a_save_and_load_of_the_map()
    {
        using var dir = TestEnv.CreateTempDir();
        var identity = new DiskImageIdentity("/var/lib/libvirt/images/g.qcow2", 7, 1 << 20, 638_000_000_000_000_000, "qcow2", new UInt128(0x0123456789abcdef, 0xfedcba9876543210));
        string path = dir.File("g.map");
        new DiskBlockMap(1 << 20, identity: identity).Save(path);
        Assert.Equal(identity, DiskBlockMap.Load(path).Identity);
    }

    private static async Task Run(string tool, params string[] args)
    {
        var psi = new ProcessStartInfo(tool) { RedirectStandardError = true, RedirectStandardOutput = true };
        foreach (var a in args) psi.ArgumentList.Add(a);
        using var p = Process.Start(psi)!;
        string err = await p.StandardError.ReadToEndAsync();
        await p.WaitForExitAsync();
        Assert.True(p.ExitCode == 0, $"{tool} failed: {err}");
    }
}
