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
/// Picks a frame codec. Compression and sending run one after the other on a stream, so the
/// cost of a frame with codec c is <c>compress_time(c) + link_time(output(c))</c>; the policy keeps
/// moving averages of each codec's speed and ratio and of the link's time per byte (time blocked
/// in writes) and picks the cheapest, re-measuring the others now and then. A codec whose last
/// ratio was above <see cref="IncompressibleRatio"/> costs full link time plus its CPU, so
/// incompressible data stops being compressed until the next probe.
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
    private long _frames;
    private int _skipCompressionFrames;

    public CompressionPolicy(CompressionMode mode) => _mode = mode;

    /// <summary>Codec for the next frame.</summary>
    public FrameCodecKind Choose()
    {
        _frames++;
        switch (_mode)
        {
            case CompressionMode.None: return FrameCodecKind.None;
            case CompressionMode.Lz4: return Fixed(FrameCodecKind.Lz4);
            case CompressionMode.Zstd: return Fixed(FrameCodecKind.Zstd);
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

    private FrameCodecKind Fixed(FrameCodecKind codec)
    {
        // A fixed codec still backs off on incompressible data, re-probing every ProbeInterval frames.
        if (_skipCompressionFrames > 0)
        {
            _skipCompressionFrames--;
            return FrameCodecKind.None;
        }
        return codec;
    }

    /// <summary>Records one compression attempt.</summary>
    public void RecordCompression(FrameCodecKind codec, int inputBytes, int outputBytes, TimeSpan elapsed)
    {
        if (codec == FrameCodecKind.None || inputBytes < 4096) return;
        double ratio = (double)outputBytes / inputBytes;
        _ratio[(int)codec] = Mix(_ratio[(int)codec], ratio);
        _nsPerByte[(int)codec] = Mix(_nsPerByte[(int)codec], elapsed.TotalNanoseconds / inputBytes);
        if (ratio > IncompressibleRatio) _skipCompressionFrames = ProbeInterval;
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
