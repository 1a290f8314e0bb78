using System.Diagnostics;
using BFMig.Daemon.Checkpoints;
using BFMig.Daemon.Tests.Infrastructure;

namespace BFMig.Daemon.Tests;

/// <summary>
/// Cleaning the image a guest left behind, with the real qemu-img and a real QEMU: a QEMU that
/// dies with the image open leaves its bitmaps flagged in use (as a migrated-away source does);
/// the cleanup removes those and BFMig's own, keeps the others, and waits while a QEMU still
/// holds the image.
/// </summary>
public sealed class ImageBitmapsTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("bfmig-bitmaps-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private static bool HaveQemu() =>
        Prerequisite("qemu-img") && Prerequisite("qemu-system-x86_64");

    private static bool Prerequisite(string tool)
    {
        if (Environment.GetEnvironmentVariable("PATH")!.Split(':').Any(d => File.Exists(Path.Combine(d, tool))))
            return true;
        if (Environment.GetEnvironmentVariable("CI") == "true")
            Assert.Fail($"{tool} is missing (package qemu-utils / qemu-system-x86)");
        Console.WriteLine($"skipped: {tool} is missing");
        return false;
    }

    private static Process StartQemu(string image, bool readOnly)
    {
        var start = new ProcessStartInfo("qemu-system-x86_64")
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            RedirectStandardInput = true,
        };
        foreach (var a in new[] { "-machine", "none", "-nodefaults", "-display", "none", "-monitor", "none", "-serial", "none",
            "-blockdev", $"driver=qcow2,node-name=d0,read-only={(readOnly ? "on" : "off")},file.driver=file,file.filename={image}" })
            start.ArgumentList.Add(a);
        return Process.Start(start)!;
    }

    [Fact]
    public async Task Stale_in_use_and_own_bitmaps_go_others_stay_and_a_running_qemu_is_waited_for()
    {
        if (!HaveQemu())
            return;
        var image = Path.Combine(_dir, "disk.qcow2");
        var images = new ImageBitmaps();
        Assert.Equal(0, Tools.Run("qemu-img", "create", "-q", "-f", "qcow2", image, "16M").ExitCode);
        Assert.Equal(0, Tools.Run("qemu-img", "bitmap", "--add", image, "c1").ExitCode);

        // A QEMU opens the image read-write (bitmaps flagged in use) and dies without storing them.
        using (var qemu = StartQemu(image, readOnly: false))
        {
            await Tools.UntilAsync(() => images.ListAsync(image, default).GetAwaiter().GetResult().Any(b => b.InUse), "c1 flagged in use");
            qemu.Kill();
            await qemu.WaitForExitAsync();
        }
        Assert.Equal(0, Tools.Run("qemu-img", "bitmap", "--add", image, "keep").ExitCode);
        Assert.Equal(0, Tools.Run("qemu-img", "bitmap", "--add", image, CheckpointKeeper.RollingBitmap).ExitCode);
        var before = await images.ListAsync(image, default);
        Assert.True(before.Single(b => b.Name == "c1").InUse);
        Assert.False(before.Single(b => b.Name == "keep").InUse);
        Assert.False(before.Single(b => b.Name == CheckpointKeeper.RollingBitmap).InUse);

        // While a QEMU holds the image, nothing is removed; once it is gone, the cleanup goes on.
        using var holder = StartQemu(image, readOnly: true);
        await Task.Delay(1500);
        var cleaning = images.RemoveStaleAsync(image, CheckpointKeeper.OwnPrefix, TimeSpan.FromSeconds(30), default);
        await Task.Delay(1500);
        Assert.False(cleaning.IsCompleted, "the cleanup must wait for the QEMU that holds the image");
        Assert.Equal(3, (await images.ListAsync(image, default)).Count);
        holder.Kill();
        var removed = await cleaning.WaitAsync(TimeSpan.FromSeconds(30));

        Assert.Equal(["bfmig/rolling", "c1"], removed.Order(StringComparer.Ordinal));
        Assert.Equal(["keep"], (await images.ListAsync(image, default)).Select(b => b.Name));
    }

    [Fact]
    public async Task A_qemu_that_never_lets_go_makes_the_cleanup_fail_with_the_reason()
    {
        if (!HaveQemu())
            return;
        var image = Path.Combine(_dir, "held.qcow2");
        Assert.Equal(0, Tools.Run("qemu-img", "create", "-q", "-f", "qcow2", image, "16M").ExitCode);
        Assert.Equal(0, Tools.Run("qemu-img", "bitmap", "--add", image, CheckpointKeeper.RollingBitmap).ExitCode);
        using var holder = StartQemu(image, readOnly: true);
        try
        {
            await Task.Delay(1500);
            var e = await Assert.ThrowsAsync<IOException>(() => new ImageBitmaps().RemoveStaleAsync(image, CheckpointKeeper.OwnPrefix, TimeSpan.FromSeconds(2), default));
            Assert.Contains("lock", e.Message);
            Assert.Single(await new ImageBitmaps().ListAsync(image, default));
        }
        finally
        {
            holder.Kill();
        }
    }

    [Fact]
    public void Info_without_bitmaps_or_of_a_raw_image_lists_none()
    {
        Assert.Empty(ImageBitmaps.Parse("""{"format":"raw","virtual-size":1}"""));
        var list = ImageBitmaps.Parse("""{"format-specific":{"type":"qcow2","data":{"bitmaps":[{"flags":["in-use","auto"],"name":"c2","granularity":65536}]}}}""");
        Assert.True(Assert.Single(list).InUse);
    }
}
