using System.Diagnostics;
using BFMig.Transfer.Disk.Nbd;
using Xunit.Abstractions;
using Xunit;

namespace BFMig.Transfer.Tests.Nbd;

/// <summary>Tool discovery, temp directories and process helpers shared by the NBD tests.</summary>
internal static class TestEnv
{
    public static bool IsCi => string.Equals(Environment.GetEnvironmentVariable("CI"), "true", StringComparison.OrdinalIgnoreCase);

    public const string Qemu10 = "/opt/bfmig-qemu10/usr/bin/qemu-system-x86_64";

    /// <summary>
    /// The header style the system's qemu-nbd ends up with when the client asks for everything:
    /// extended headers from QEMU 9.0 on (Debian 12 ships 7.2, bookworm-backports 10.0; the lab
    /// can switch the machine between them).
    /// </summary>
    public static NbdHeaderStyle SystemNbdServerBestStyle => SystemQemuMajor.Value >= 9 ? NbdHeaderStyle.Extended : NbdHeaderStyle.Structured;

    private static readonly Lazy<int> SystemQemuMajor = new(() =>
    {
        var psi = new ProcessStartInfo("qemu-nbd", "--version") { RedirectStandardOutput = true };
        using var p = Process.Start(psi)!;
        string text = p.StandardOutput.ReadToEnd();
        p.WaitForExit();
        // "qemu-nbd 7.2.22 (Debian ...)"
        var match = System.Text.RegularExpressions.Regex.Match(text, @"qemu-nbd (\d+)\.");
        return match.Success ? int.Parse(match.Groups[1].Value, System.Globalization.CultureInfo.InvariantCulture) : throw new InvalidOperationException($"cannot read qemu-nbd's version from '{text.Trim()}'");
    });

    /// <summary>
    /// True when every tool is on PATH. Otherwise fails under CI=true, or prints why and
    /// returns false so the test can return early.
    /// </summary>
    public static bool Require(ITestOutputHelper output, params string[] tools)
    {
        foreach (string tool in tools)
        {
            bool found = tool.StartsWith('/') ? File.Exists(tool) : FindOnPath(tool) is not null;
            if (found)
                continue;
            string why = $"SKIPPED: '{tool}' is not installed";
            if (IsCi)
                Assert.Fail(why + " (CI=true: required)");
            output.WriteLine(why);
            return false;
        }
        return true;
    }

    private static string? FindOnPath(string tool)
    {
        foreach (string dir in (Environment.GetEnvironmentVariable("PATH") ?? "").Split(':'))
        {
            string candidate = Path.Combine(dir, tool);
            if (File.Exists(candidate))
                return candidate;
        }
        return null;
    }

    public static TempDir CreateTempDir() => new();

    /// <summary>Runs a tool to completion (with a timeout) and returns stdout; throws with stderr on failure.</summary>
    public static async Task<string> RunAsync(string file, IEnumerable<string> args, int timeoutSeconds = 120, int[]? okExitCodes = null)
    {
        var psi = new ProcessStartInfo(file) { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        foreach (string a in args)
            psi.ArgumentList.Add(a);
        using var p = Process.Start(psi)!;
        var stdout = p.StandardOutput.ReadToEndAsync();
        var stderr = p.StandardError.ReadToEndAsync();
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(timeoutSeconds));
        try
        {
            await p.WaitForExitAsync(cts.Token);
        }
        catch (OperationCanceledException)
        {
            p.Kill();
            throw new TimeoutException($"{file} {string.Join(' ', args)} did not finish in {timeoutSeconds}s");
        }
        okExitCodes ??= [0];
        if (!okExitCodes.Contains(p.ExitCode))
            throw new InvalidOperationException($"{file} {string.Join(' ', args)} exited {p.ExitCode}: {await stderr}{await stdout}");
        return await stdout;
    }

    public static async Task<int> ExitCodeAsync(string file, IEnumerable<string> args, int timeoutSeconds = 120)
    {
        var psi = new ProcessStartInfo(file) { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        foreach (string a in args)
            psi.ArgumentList.Add(a);
        using var p = Process.Start(psi)!;
        var stdout = p.StandardOutput.ReadToEndAsync();
        var stderr = p.StandardError.ReadToEndAsync();
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(timeoutSeconds));
        await p.WaitForExitAsync(cts.Token);
        await stdout;
        await stderr;
        return p.ExitCode;
    }
}

/// <summary>A directory under /tmp removed on dispose. Unix socket paths must stay short (108 bytes).</summary>
internal sealed class TempDir : IDisposable
{
    public TempDir()
    {
        Path = System.IO.Path.Combine("/tmp", "bfnbd-" + Guid.NewGuid().ToString("N")[..10]);
        Directory.CreateDirectory(Path);
    }

    public string Path { get; }

    public string File(string name) => System.IO.Path.Combine(Path, name);

    public void Dispose()
    {
        try
        {
            Directory.Delete(Path, recursive: true);
        }
        catch (IOException)
        {
        }
    }
}

/// <summary>qemu-img / qemu-io helpers.</summary>
internal static class Images
{
    public static Task CreateAsync(string path, ulong size, string format = "qcow2") =>
        TestEnv.RunAsync("qemu-img", ["create", "-q", "-f", format, path, size.ToString(System.Globalization.CultureInfo.InvariantCulture)]);

    /// <summary>Writes a raw file (deterministic pseudo-random content) and converts it to qcow2.</summary>
    public static async Task CreateRandomQcow2Async(string path, ulong size, int seed, double fillFraction = 1.0)
    {
        string raw = path + ".raw";
        CreateRandomRaw(raw, size, seed, fillFraction);
        await TestEnv.RunAsync("qemu-img", ["convert", "-q", "-f", "raw", "-O", "qcow2", raw, path]);
        File.Delete(raw);
    }

    /// <summary>Writes a raw file of deterministic pseudo-random content (unfilled blocks are holes).</summary>
    public static void CreateRandomRaw(string raw, ulong size, int seed, double fillFraction = 1.0)
    {
        var rng = new Random(seed);
        using (var f = new FileStream(raw, FileMode.Create))
        {
            var block = new byte[65536];
            for (ulong at = 0; at < size; at += (ulong)block.Length)
            {
                if (rng.NextDouble() < fillFraction)
                {
                    rng.NextBytes(block);
                    f.Write(block, 0, (int)Math.Min((ulong)block.Length, size - at));
                }
                else
                {
                    f.Seek((long)Math.Min((ulong)block.Length, size - at), SeekOrigin.Current);
                }
            }
            f.SetLength((long)size);
        }
    }

    public static Task CopyAsync(string from, string to) =>
        TestEnv.RunAsync("qemu-img", ["convert", "-q", "-f", "qcow2", "-O", "qcow2", from, to]);

    /// <summary>Runs qemu-io commands (e.g. "write -P 0x41 0 64k") on an image.</summary>
    public static Task IoAsync(string path, IEnumerable<string> commands, string format = "qcow2")
    {
        var args = new List<string> { "-f", format };
        foreach (string c in commands)
        {
            args.Add("-c");
            args.Add(c);
        }
        args.Add(path);
        return TestEnv.RunAsync("qemu-io", args);
    }

    /// <summary>True when qemu-img compare says the images read the same.</summary>
    public static async Task<(bool Identical, string Output)> CompareAsync(string a, string b, string format = "qcow2")
    {
        string output = await TestEnv.RunAsync("qemu-img", ["compare", "-f", format, "-F", format, a, b], okExitCodes: [0, 1]);
        return (output.Contains("Images are identical", StringComparison.Ordinal), output);
    }
}
