namespace BFMig.Transfer.Disk;

/// <summary>
/// A stored disk block map is unusable (truncated, bad magic, wrong checksum, absurd geometry).
/// The message names the file, byte offset and field. Nothing may be elided on its account:
/// treat every block as unknown and re-send.
/// </summary>
public sealed class DiskMapException : Exception
{
    public DiskMapException(string message)
        : base(message)
    {
    }

    public DiskMapException(string message, Exception innerException)
        : base(message, innerException)
    {
    }

    public DiskMapException()
    {
    }
}
