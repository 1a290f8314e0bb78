using System.Diagnostics;
using System.Text.Json;

namespace BFMig.Daemon.Checkpoints;

/// <summary>A persistent bitmap stored in a qcow2 image (<c>qemu-img info</c>).</summary>
public sealed record ImageBitmap(string Name, IReadOnlyList<string> Flags)
{
    /// <summary>Flagged in use: a QEMU had it loaded and did not store it back (stale once that QEMU is gone).</summary>
    public bool InUse => Flags.Contains("in-use");
}

/// <summary>
/// Reads and cleans the persistent bitmaps of image files with <c>qemu-img</c>. Cleaning takes
/// the image's write lock, so it fails (and changes nothing) while a QEMU holds the image.
/// </summary>
public sealed class ImageBitmaps(string qemuImg = "qemu-img")
{
    private static readonly TimeSpan CommandTimeout = TimeSpan.FromSeconds(60);

    /// <summary>The bitmaps stored in <paramref name="image"/> (read with <c>-U</c>: works while a QEMU runs on it).</summary>
    public async Task<IReadOnlyList<ImageBitmap>> ListAsync(string image, CancellationToken ct)
    {
        var (code, output, error) = await RunAsync(["info", "--output=json", "-U", image], ct).ConfigureAwait(false);
        if (code != 0)
            throw new IOException($"qemu-img info {image} failed ({code}): {error.Trim()}");
        return Parse(output);
    }

    /// <summary>Reads <c>qemu-img info --output=json</c>: the qcow2 bitmaps, none for other formats.</summary>
    public static IReadOnlyList<ImageBitmap> Parse(string infoJson)
    {
        using var doc = JsonDocument.Parse(infoJson);
        if (!doc.RootElement.TryGetProperty("format-specific", out var specific)
            || !specific.TryGetProperty("data", out var data)
            || !data.TryGetProperty("bitmaps", out var bitmaps)
            || bitmaps.ValueKind != JsonValueKind.Array)
            return [];
        return [.. bitmaps.EnumerateArray().Select(b => new ImageBitmap(
            b.GetProperty("name").GetString() ?? "",
            b.TryGetProperty("flags", out var f) ? [.. f.EnumerateArray().Select(x => x.GetString() ?? "")] : []))];
    }

    /// <summary>Removes one bitmap (<c>qemu-img bitmap --remove</c>); throws <see cref="IOException"/> with qemu-img's reason.</summary>
    public async Task RemoveAsync(string image, string bitmap, CancellationToken ct)
    {
        var (code, _, error) = await RunAsync(["bitmap", "--remove", image, bitmap], ct).ConfigureAwait(false);
        if (code != 0)
            throw new IOException($"qemu-img bitmap --remove {image} {bitmap} failed ({code}): {error.Trim()}");
    }

    /// <summary>
    /// Removes every bitmap flagged in use and every bitmap whose name starts with
    /// <paramref name="ownPrefix"/>; others stay. While a QEMU holds the image (qemu-img cannot
    /// get the write lock) it waits and retries, for at most <paramref name="lockWait"/>, then
    /// throws <see cref="IOException"/> with qemu-img's reason. Returns the names removed.
    /// </summary>
    public async Task<IReadOnlyList<string>> RemoveStaleAsync(string image, string ownPrefix, TimeSpan lockWait, CancellationToken ct)
    {
        var removed = new List<string>();
        var deadline = DateTime.UtcNow + lockWait;
        while (true)
        {
            try
            {
                foreach (var bitmap in await ListAsync(image, ct).ConfigureAwait(false))
                {
                    if (!bitmap.InUse && !bitmap.Name.StartsWith(ownPrefix, StringComparison.Ordinal))
                        continue;
                    await RemoveAsync(image, bitmap.Name, ct).ConfigureAwait(false);
                    removed.Add(bitmap.Name);
                }
                return removed;
            }
            catch (IOException e) when (DateTime.UtcNow < deadline && e.Message.Contains("lock", StringComparison.OrdinalIgnoreCase))
            {
                await Task.Delay(TimeSpan.FromMilliseconds(500), ct).ConfigureAwait(false);
            }
        }
    }

    private async Task<(int Code, string Output, string Error)> RunAsync(IReadOnlyList<string> args, CancellationToken ct)
    {
        var start = new ProcessStartInfo(qemuImg) { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        foreach (var a in args)
            start.ArgumentList.Add(a);
        using var process = Process.Start(start) ?? throw new IOException($"cannot start {qemuImg}");
        using var cts = CancellationTokenSource.CreateLinkedTokenSource(ct);
        cts.CancelAfter(CommandTimeout);
        var output = process.StandardOutput.ReadToEndAsync(cts.Token);
        var error = process.StandardError.ReadToEndAsync(cts.Token);
        try
        {
            await process.WaitForExitAsync(cts.Token).ConfigureAwait(false);
        }
        catch (OperationCanceledException)
        {
            process.Kill();
            throw new IOException($"{qemuImg} {string.Join(' ', args)} did not finish within {CommandTimeout.TotalSeconds:F0} s");
        }
        return (process.ExitCode, await output.ConfigureAwait(false), await error.ConfigureAwait(false));
    }
}
