namespace BFMig.Transfer.Wire;

/// <summary>Which codec the sender may use.</summary>
public enum CompressionMode
{
    /// <summary>Pick per frame from measured compressor and link throughput.</summary>
    Auto,
    None,
    Zstd,
    Lz4,
}

/// <summary>
/// Picks a frame codec. The cost of a frame with codec c is taken as
/// <c>compress_time(c) + link_time(output(c))</c> (on the memory sender a <see cref="FramePipeline"/>
/// overlaps one frame's compression with another's sending, so this errs towards cheaper codecs); the policy keeps
/// moving averages of each codec's speed and ratio and of the link's time per byte (time blocked
/// in writes) and picks the cheapest, re-measuring the others now and then. Before compressing a
/// frame, a 4 KiB sample from its middle goes through LZ4 (about 1% of the frame's cost): if even
/// that is above <see cref="IncompressibleRatio"/>, the frame goes uncompressed, so incompressible
/// data costs almost no CPU and compressible data right after it is compressed again at once.
/// </summary>
public sealed class CompressionPolicy
{
    /// <summary>Above this output/input ratio, compression is not worth its CPU.</summary>
    public const double IncompressibleRatio = 0.97;
    private const int ProbeInterval = 32;
    private const double Alpha = 0.2;

    private readonly CompressionMode _mode;
    private readonly double[] _nsPerByte = [0, 2.0, 0.4];   // None, Zstd(level 1), Lz4: priors, refined by measurement
    private readonly double[] _ratio = [1.0, 0.5, 0.6];
    private double _linkNsPerByte = 8.0;                      // prior: 1 Gbit/s
    private const int SampleSize = 4096;
    private readonly byte[] _sample = new byte[BFMig.Native.Compression.Lz4Codec.CompressBound(SampleSize)];
    private long _frames;

    public CompressionPolicy(CompressionMode mode) => _mode = mode;

    /// <summary>Codec for a frame with <paramref name="payload"/>.</summary>
    public FrameCodecKind Choose(ReadOnlySpan<byte> payload)
    {
        if (_mode == CompressionMode.None || LooksIncompressible(payload)) return FrameCodecKind.None;
        return Choose();
    }

    /// <summary>True when an LZ4 pass over a sample of <paramref name="payload"/> does not pay.</summary>
    public bool LooksIncompressible(ReadOnlySpan<byte> payload)
    {
        if (payload.Length < 4 * SampleSize) return false;
        var sample = payload.Slice((payload.Length / 2) - (SampleSize / 2), SampleSize);
        int n = BFMig.Native.Compression.Lz4Codec.Compress(sample, _sample);
        return n > IncompressibleRatio * SampleSize;
    }

    /// <summary>Codec for the next frame, from the measurements alone.</summary>
    public FrameCodecKind Choose()
    {
        _frames++;
        switch (_mode)
        {
            case CompressionMode.None: return FrameCodecKind.None;
            case CompressionMode.Lz4: return FrameCodecKind.Lz4;
            case CompressionMode.Zstd: return FrameCodecKind.Zstd;
        }
        if (_frames % ProbeInterval == 0) return _frames / ProbeInterval % 2 == 0 ? FrameCodecKind.Lz4 : FrameCodecKind.Zstd;
        var best = FrameCodecKind.None;
        double bestCost = _linkNsPerByte;
        foreach (var c in (ReadOnlySpan<FrameCodecKind>)[FrameCodecKind.Zstd, FrameCodecKind.Lz4])
        {
            double cost = _nsPerByte[(int)c] + _linkNsPerByte * _ratio[(int)c];
            if (cost < bestCost)
            {
                best = c;
                bestCost = cost;
            }
        }
        return best;
    }

    /// <summary>Records one compression attempt.</summary>
    public void RecordCompression(FrameCodecKind codec, int inputBytes, int outputBytes, TimeSpan elapsed)
    {
        if (codec == FrameCodecKind.None || inputBytes < 4096) return;
        double ratio = (double)outputBytes / inputBytes;
        _ratio[(int)codec] = Mix(_ratio[(int)codec], ratio);
        _nsPerByte[(int)codec] = Mix(_nsPerByte[(int)codec], elapsed.TotalNanoseconds / inputBytes);
    }

    /// <summary>Records time spent writing <paramref name="wireBytes"/> to the peer.</summary>
    public void RecordSend(int wireBytes, TimeSpan elapsed)
    {
        if (wireBytes < 4096) return;
        _linkNsPerByte = Mix(_linkNsPerByte, elapsed.TotalNanoseconds / wireBytes);
    }

    private static double Mix(double old, double sample) => old + (Alpha * (sample - old));

    /// <summary>Measured link time per byte (ns), for stats.</summary>
    public double LinkNsPerByte => _linkNsPerByte;
}
