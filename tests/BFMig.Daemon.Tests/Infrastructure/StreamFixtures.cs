using System.Diagnostics;

namespace BFMig.Daemon.Tests.Infrastructure;

/// <summary>The captured QEMU streams in Fixtures/ (zstd-compressed in the repository).</summary>
public static class StreamFixtures
{
    /// <summary>The decompressed bytes of fixture <paramref name="name"/>.</summary>
    public static byte[] Load(string name)
    {
        var path = Path.Combine(AppContext.BaseDirectory, "Fixtures", name);
        var start = new ProcessStartInfo("zstd", ["-d", "-c", path]) { RedirectStandardOutput = true };
        using var zstd = Process.Start(start)!;
        using var bytes = new MemoryStream();
        zstd.StandardOutput.BaseStream.CopyTo(bytes);
        Assert.True(zstd.WaitForExit(30_000) && zstd.ExitCode == 0, "zstd could not decompress the fixture");
        return bytes.ToArray();
    }
}
