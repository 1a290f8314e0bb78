namespace BFMig.Transfer;

/// <summary>
/// A QEMU ended its migration stream before the stream's end (the memory stream before its
/// device state, the disk mirror without NBD_CMD_DISC): the migration was cancelled or failed.
/// What both helpers carried until then may still be kept (they agreed on it at the end
/// exchange), but the stream is reported failed: a non-zero exit with this reason.
/// </summary>
public sealed class StreamCutException : IOException
{
    public StreamCutException(string message) : base(message) { }
    public StreamCutException(string message, Exception inner) : base(message, inner) { }
    public StreamCutException() { }
}
