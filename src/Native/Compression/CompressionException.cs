namespace BFMig.Native.Compression;

/// <summary>A compression library call failed (corrupt input, output too small, out of memory).</summary>
public sealed class CompressionException : Exception
{
    public CompressionException(string message) : base(message) { }
    public CompressionException() { }
    public CompressionException(string message, Exception inner) : base(message, inner) { }
}
