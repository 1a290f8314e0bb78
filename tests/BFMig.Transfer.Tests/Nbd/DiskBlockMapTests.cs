using BFMig.Tests.Shared.Nbd;
using BFMig.Transfer.Disk;
using BFMig.Transfer.Store;
using Xunit.Abstractions;
using Xunit;

namespace BFMig.Transfer.Tests.Nbd;

public sealed class DiskBlockMapTests(ITestOutputHelper output)
{
    private static readonly DiskHashKey Key3 = new(Enumerable.Repeat((byte)3, DiskHashKey.Length).ToArray());

    private static DiskBlockMap Sample(out DiskImageIdentity identity)
    {
        identity = new DiskImageIdentity("/var/lib/libvirt/images/guest.qcow2", 1234567, 42 << 20, 638_000_000_000_000_000, "qcow2");
        var map = new DiskBlockMap((10UL << 20) + 4096, 65536, DiskHashKey.NewRandom(), identity);
        var rng = new Random(7);
        for (long b = 0; b < map.BlockCount; b++)
        {
            if (b % 3 != 0)
                map.Set(b, new UInt128((ulong)rng.NextInt64(), (ulong)rng.NextInt64()));
        }
        return map;
    }

    [Fact]
    public void SaveLoadRoundTripKeepsEveryBlockAndTheIdentity()
    {
        using var dir = TestEnv.CreateTempDir();
        var map = Sample(out var identity);
        string path = dir.File("disk.map");
        map.Save(path);
        var loaded = DiskBlockMap.Load(path);
        Assert.Equal(map.ComputeDigest(), loaded.ComputeDigest());
        Assert.Equal(identity, loaded.Identity);
        Assert.Equal(161, loaded.BlockCount);
        Assert.Equal(map.KnownCount, loaded.KnownCount);
        Assert.False(loaded.TryGetHash(0, out _));
        Assert.True(loaded.TryGetHash(1, out var h1));
        map.TryGetHash(1, out var e1);
        Assert.Equal(e1, h1);
        Assert.False(File.Exists(path + ".tmp"));
    }

    [Fact]
    public void DigestChangesWithAnyBlock()
    {
        var map = Sample(out _);
        var before = map.ComputeDigest();
        var copy = map.Clone();
        Assert.Equal(before, copy.ComputeDigest());
        copy.Set(5, null);
        Assert.NotEqual(before, copy.ComputeDigest());
        copy = map.Clone();
        copy.Set(0, default(UInt128));
        Assert.NotEqual(before, copy.ComputeDigest());
    }

    [Theory]
    [InlineData(0, "bad magic")]
    [InlineData(8, "bad version")]
    [InlineData(16, "bad block size")]
    [InlineData(40, "bad block count")]
    [InlineData(200, "bad checksum")]
    [InlineData(-3, "bad checksum")]
    public void CorruptionIsReportedWithFieldAndOffset(int offset, string expected)
    {
        using var dir = TestEnv.CreateTempDir();
        string path = dir.File("disk.map");
        Sample(out _).Save(path);
        byte[] bytes = File.ReadAllBytes(path);
        bytes[offset < 0 ? bytes.Length + offset : offset] ^= 0x5a;
        File.WriteAllBytes(path, bytes);
        var e = Assert.Throws<DiskMapException>(() => DiskBlockMap.Load(path));
        output.WriteLine(e.Message);
        Assert.Contains(expected, e.Message, StringComparison.Ordinal);
        Assert.Contains(path, e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void TruncatedFileIsRejectedBeforeAllocating()
    {
        using var dir = TestEnv.CreateTempDir();
        string path = dir.File("disk.map");
        Sample(out _).Save(path);
        byte[] bytes = File.ReadAllBytes(path);
        File.WriteAllBytes(path, bytes[..^100]);
        Assert.Contains("bad file length", Assert.Throws<DiskMapException>(() => DiskBlockMap.Load(path)).Message, StringComparison.Ordinal);
        File.WriteAllBytes(path, bytes[..30]);
        Assert.Contains("truncated in header", Assert.Throws<DiskMapException>(() => DiskBlockMap.Load(path)).Message, StringComparison.Ordinal);
    }

    [Fact]
    public void AbsurdGeometryIsRejected()
    {
        using var dir = TestEnv.CreateTempDir();
        string path = dir.File("disk.map");
        Sample(out _).Save(path);
        byte[] bytes = File.ReadAllBytes(path);
        BitConverter.TryWriteBytes(bytes.AsSpan(32), ulong.MaxValue);
        File.WriteAllBytes(path, bytes);
        Assert.Contains("bad image size", Assert.Throws<DiskMapException>(() => DiskBlockMap.Load(path)).Message, StringComparison.Ordinal);
    }

    [Fact]
    public async Task InFluxMarkerStaleIdentityAndUncleanTripMakeTheMapUntrusted()
    {
        using var dir = TestEnv.CreateTempDir();
        string image = dir.File("guest.raw");
        await File.WriteAllBytesAsync(image, new byte[1 << 20]);
        var identity = DiskImageIdentity.Capture(image, "raw");
        Assert.NotEqual(0UL, identity.Inode);
        var map = new DiskBlockMap(1 << 20, identity: identity);
        string path = dir.File("guest.map");
        map.Save(path);
        Assert.NotNull(DiskBlockMap.TryLoadValid(path, identity));

        DiskBlockMap.MarkInFlux(path);
        Assert.True(DiskBlockMap.IsInFlux(path));
        Assert.Null(DiskBlockMap.TryLoadValid(path, identity));
        DiskBlockMap.ClearInFlux(path);
        Assert.NotNull(DiskBlockMap.TryLoadValid(path, identity));

        File.SetLastWriteTimeUtc(image, DateTime.UtcNow.AddMinutes(5));
        Assert.Null(DiskBlockMap.TryLoadValid(path, DiskImageIdentity.Capture(image, "raw")));

        IDiskRecorder recorder = map;
        recorder.BeginTrip(1 << 20, 65536, DiskHashKey.Unkeyed);
        recorder.EndTrip(clean: false);
        map.Save(path);
        Assert.Null(DiskBlockMap.TryLoadValid(path, identity));
        File.WriteAllText(path, "garbage");
        Assert.Null(DiskBlockMap.TryLoadValid(path, identity));
    }

    [Fact]
    public async Task BuilderHashesWhatQemuReads()
    {
        if (!TestEnv.Require(output, "qemu-nbd", "qemu-img"))
            return;
        using var dir = TestEnv.CreateTempDir();
        string raw = dir.File("img.raw");
        string qcow2 = dir.File("img.qcow2");
        var content = new byte[(3 << 20) + 12345];
        new Random(11).NextBytes(content.AsSpan(0, 1 << 20));
        new Random(12).NextBytes(content.AsSpan(2 << 20));
        await File.WriteAllBytesAsync(raw, content);
        await TestEnv.RunAsync("qemu-img", ["convert", "-q", "-f", "raw", "-O", "qcow2", raw, qcow2]);

        var map = await DiskBlockMapBuilder.BuildFromImageAsync(qcow2, "qcow2", 65536, Key3);

        // qcow2 rounds the virtual size up to 512 bytes.
        var expected = FakeRig.MapOf([.. content, .. new byte[(int)(map.ImageSize - (ulong)content.Length)]], 65536, Key3);
        Assert.Equal(expected.ComputeDigest(), map.ComputeDigest());
        Assert.Equal("qcow2", map.Identity!.Format);
        Assert.True(map.TryGetHash(20, out var zero));
        Assert.Equal(DiskBlockHash.Zero(65536, Key3), zero);
    }
}
