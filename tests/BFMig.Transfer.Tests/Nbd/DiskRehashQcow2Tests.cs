using System.Diagnostics;
using BFMig.Native.Linux;
using BFMig.Tests.Shared.Nbd;
using BFMig.Transfer.Disk;
using Xunit;

namespace BFMig.Transfer.Tests.Nbd;

/// <summary>
/// DiskRehash of qcow2 images through a real qemu-nbd run as an unprivileged user ("nobody"
/// stands for the QEMU user): what it proves (the guest-visible content, backing chain
/// included), what that user cannot read, and that qemu-nbd never outlives a cancelled re-hash.
/// </summary>
public sealed class DiskRehashQcow2Tests : IDisposable
{
    private const int Block = DiskMapStore.BlockSize;
    private static readonly DiskRehashLimits Fast = new(0, TimeSpan.FromSeconds(60));
    private readonly string _dir = Directory.CreateTempSubdirectory("bfmig-rehash-qcow2-").FullName;
    private readonly NodeOwner _qemu;

    public DiskRehashQcow2Tests()
    {
        var user = UnixUsers.GetUser("nobody") ?? throw new InvalidOperationException("no user 'nobody' on this host");
        _qemu = new NodeOwner(user.Uid, user.Gid);
        // The QEMU user reaches the images (as libvirt's images directory lets it), not the re-hash lock.
        UnixUsers.ChangeMode(_dir, (UnixFileMode)0b111_101_101);
    }

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private static void Run(string program, params string[] args)
    {
        var psi = new ProcessStartInfo(program) { RedirectStandardOutput = true, RedirectStandardError = true };
        foreach (string a in args)
            psi.ArgumentList.Add(a);
        using var p = Process.Start(psi)!;
        string err = p.StandardError.ReadToEnd();
        p.StandardOutput.ReadToEnd();
        p.WaitForExit();
        Assert.True(p.ExitCode == 0, $"{program} {string.Join(' ', args)}: exit {p.ExitCode}: {err}");
    }

    // A qcow2 image of SIZE MiB (over BACKING when given), owned by the QEMU user as libvirt lends it.
    private DiskImageSpec Qcow2(string name, int mib, string? backing = null)
    {
        string path = Path.Combine(_dir, name);
        if (backing is null)
            Run("qemu-img", "create", "-q", "-f", "qcow2", path, $"{mib}M");
        else
            Run("qemu-img", "create", "-q", "-f", "qcow2", "-b", backing, "-F", "qcow2", path, $"{mib}M");
        UnixUsers.ChangeOwner(path, _qemu.Uid, _qemu.Gid);
        return new DiskImageSpec(path, "qcow2");
    }

    // Writes through QEMU's own qcow2 driver, as a guest would.
    private static void Write(DiskImageSpec image, long offset, int length, byte pattern) =>
        Run("qemu-io", "-f", "qcow2", "-c", $"write -P 0x{pattern:x2} {offset} {length}", image.Path);

    private static Task<DiskBlockMap> MapOf(DiskImageSpec image) =>
        DiskBlockMapBuilder.BuildFromImageAsync(image.Path, "qcow2", Block, DiskHashKey.NewRandom());

    [Fact]
    public async Task A_qcow2_rehash_finds_exactly_the_blocks_written_after_the_map()
    {
        var image = Qcow2("disk.qcow2", 16);
        Write(image, 0, 4 << 20, 0x11);
        Write(image, 150L * Block, 3 * Block, 0x12);
        var map = await MapOf(image);
        Write(image, 3L * Block + 17, 1, 0x5a);
        Write(image, 99L * Block, 2 * Block, 0xa5);
        // A block never allocated was known too (as zeroes): a write there shows.
        Write(image, 200L * Block, 512, 0x33);
        // Rewriting a block with what it held is no change.
        Write(image, 151L * Block, Block, 0x12);
        var (result, why) = await DiskRehash.ProveAsync(image, map, _dir, Fast, _qemu, CancellationToken.None);
        Assert.Null(why);
        Assert.Equal([new BlockRange(3, 1), new BlockRange(99, 2), new BlockRange(200, 1)], result!.Differing.Ranges);
        Assert.Equal(256, result.KnownBlocks);
        Assert.Equal(16L << 20, result.BytesRead);
    }

    [Fact]
    public async Task A_backing_file_is_part_of_the_content_read()
    {
        var bottom = Qcow2("base.qcow2", 16);
        Write(bottom, 0, 8 << 20, 0x22);
        var image = Qcow2("overlay.qcow2", 16, bottom.Path);
        Write(image, 40L * Block, Block, 0x44);
        var map = await MapOf(image);
        Write(image, 5L * Block, Block, 0x55);
        // Under a block the overlay does not hold, the base's content is the disk's.
        Write(bottom, 50L * Block, 100, 0x66);
        // Under one it holds, the base's content is not.
        Write(bottom, 40L * Block, Block, 0x67);
        var (result, why) = await DiskRehash.ProveAsync(image, map, _dir, Fast, _qemu, CancellationToken.None);
        Assert.Null(why);
        Assert.Equal([new BlockRange(5, 1), new BlockRange(50, 1)], result!.Differing.Ranges);
    }

    [Fact]
    public async Task What_the_QEMU_user_cannot_read_is_refused()
    {
        var image = Qcow2("disk.qcow2", 4);
        var map = await MapOf(image);
        // Root's own file: qemu-nbd, run as the QEMU user, cannot open it.
        UnixUsers.ChangeOwner(image.Path, 0, 0);
        UnixUsers.ChangeMode(image.Path, (UnixFileMode)0b110_000_000);
        var (result, why) = await DiskRehash.ProveAsync(image, map, _dir, Fast, _qemu, CancellationToken.None);
        Assert.Null(result);
        Assert.True(why!.Contains("qemu-nbd exited", StringComparison.Ordinal), why);

        // Nor through a backing file its header names.
        var secret = Qcow2("secret.qcow2", 4);
        Write(secret, 0, Block, 0x77);
        UnixUsers.ChangeOwner(secret.Path, 0, 0);
        UnixUsers.ChangeMode(secret.Path, (UnixFileMode)0b110_000_000);
        var overlay = Qcow2("overlay.qcow2", 4, secret.Path);
        var overlayMap = await MapOf(overlay);
        (result, why) = await DiskRehash.ProveAsync(overlay, overlayMap, _dir, Fast, _qemu, CancellationToken.None);
        Assert.Null(result);
        Assert.True(why!.Contains("qemu-nbd exited", StringComparison.Ordinal), why);

        // And without the QEMU user a qcow2 image is not read at all.
        UnixUsers.ChangeOwner(image.Path, _qemu.Uid, _qemu.Gid);
        (result, why) = await DiskRehash.ProveAsync(image, map, _dir, Fast, null, CancellationToken.None);
        Assert.Null(result);
        Assert.Contains("only as the QEMU user", why);
    }

    [Fact]
    public async Task Cancellation_kills_qemu_nbd()
    {
        var image = Qcow2("disk.qcow2", 32);
        Write(image, 0, 32 << 20, 0x21);
        var map = await MapOf(image);
        using var cts = new CancellationTokenSource();
        // 1 MB/s: after its first 4 MiB the re-hash waits seconds for the rate cap, qemu-nbd running.
        var rehash = DiskRehash.ProveAsync(image, map, _dir, new DiskRehashLimits(1_000_000, TimeSpan.FromSeconds(60)), _qemu, cts.Token);
        var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(20);
        while (QemuNbdServing(image.Path).Count == 0)
        {
            Assert.True(DateTime.UtcNow < deadline, "qemu-nbd never started");
            await Task.Delay(20);
        }
        int pid = QemuNbdServing(image.Path)[0];
        Assert.Equal(_qemu.Uid, OwnerOf(pid));
        await cts.CancelAsync();
        await Assert.ThrowsAnyAsync<OperationCanceledException>(() => rehash);
        Assert.Empty(QemuNbdServing(image.Path));
        Assert.False(Directory.Exists($"/proc/{pid}"), $"qemu-nbd {pid} was not reaped");
    }

    // Pids of the qemu-nbd processes serving PATH.
    private static List<int> QemuNbdServing(string path)
    {
        var pids = new List<int>();
        foreach (var dir in Directory.EnumerateDirectories("/proc"))
        {
            if (!int.TryParse(Path.GetFileName(dir), out int pid))
                continue;
            try
            {
                string[] argv = File.ReadAllText(Path.Combine(dir, "cmdline")).Split('\0');
                if (argv.Length > 0 && Path.GetFileName(argv[0]) == "qemu-nbd" && argv.Any(a => a.Contains(path, StringComparison.Ordinal)))
                    pids.Add(pid);
            }
            catch (IOException)
            {
            }
        }
        return pids;
    }

    private static uint OwnerOf(int pid) =>
        uint.Parse(File.ReadLines($"/proc/{pid}/status").First(l => l.StartsWith("Uid:", StringComparison.Ordinal)).Split('\t', StringSplitOptions.RemoveEmptyEntries)[1]);
}
