using BFMig.Transfer.Memory;
using BenchmarkDotNet.Attributes;

namespace BFMig.Benchmarks;

/// <summary>Per-page primitives of the sender's hot path.</summary>
[MemoryDiagnoser]
public class PageBenchmarks
{
    private readonly byte[] _a = new byte[4096];
    private readonly byte[] _b = new byte[4096];
    private readonly byte[] _out = new byte[8192];

    [GlobalSetup]
    public void Setup()
    {
        new Random(1).NextBytes(_a);
        _a.CopyTo(_b, 0);
        for (int i = 0; i < 4096; i += 512) _b[i] ^= 0xff;
    }

    [Benchmark(Baseline = true)]
    public void Memcpy() => _a.AsSpan().CopyTo(_out);

    [Benchmark]
    public UInt128 Hash() => MemoryStore.HashPage(_a, 12345);

    [Benchmark]
    public int Delta() => PageDelta.Encode(_a, _b, _out, 2048);
}
