namespace BFMig.Benchmarks;

/// <summary>
/// Pages cut from real files on this machine, in a fixed order: shared libraries and Python
/// sources, the kind of content a guest's page cache holds. All-zero pages are left out (QEMU
/// sends those as ZERO records, never as data), and so is every page already taken once: such
/// files repeat pages a lot (5 of 6 in the first 256 MiB here), which the sender would rightly
/// send as references, and this corpus is for measuring the compression path. The same machine gives the same pages every run;
/// another machine gives similar ones, so figures from it are printed next to the synthetic ones
/// rather than instead of them.
/// </summary>
internal static class RealFilePages
{
    private static readonly string[] Roots = ["/usr/lib/x86_64-linux-gnu", "/usr/lib/python3"];
    private static List<byte[]>? _corpus;

    /// <summary><paramref name="count"/> pages starting at page <paramref name="skip"/> of the corpus (wrapping around).</summary>
    public static byte[][] Take(int skip, int count)
    {
        var corpus = Corpus(skip + count);
        return Enumerable.Range(skip, count).Select(i => corpus[i % corpus.Count]).ToArray();
    }

    private static List<byte[]> Corpus(int wanted)
    {
        if (_corpus is { } c && c.Count >= wanted) return c;
        var pages = new List<byte[]>(wanted);
        var seen = new HashSet<UInt128>();
        var files = Roots.Where(Directory.Exists)
            .SelectMany(r => Directory.EnumerateFiles(r, "*", new EnumerationOptions { RecurseSubdirectories = true, AttributesToSkip = FileAttributes.ReparsePoint }))
            .Where(f => f.EndsWith(".py", StringComparison.Ordinal) || f.Contains(".so", StringComparison.Ordinal))
            .Order(StringComparer.Ordinal);
        foreach (var file in files)
        {
            byte[] bytes;
            try
            {
                bytes = File.ReadAllBytes(file);
            }
            catch (IOException)
            {
                continue;
            }
            catch (UnauthorizedAccessException)
            {
                continue;
            }
            for (int at = 0; at + 4096 <= bytes.Length && pages.Count < wanted; at += 4096)
            {
                var page = bytes.AsSpan(at, 4096);
                if (!page.ContainsAnyExcept((byte)0) || !seen.Add(System.IO.Hashing.XxHash128.HashToUInt128(page))) continue;
                pages.Add(page.ToArray());
            }
            if (pages.Count >= wanted) break;
        }
        if (pages.Count == 0) throw new InvalidOperationException($"no readable files under {string.Join(", ", Roots)} for the real-files scenario");
        _corpus = pages;
        return pages;
    }
}
