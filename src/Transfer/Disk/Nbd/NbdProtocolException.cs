namespace BFMig.Transfer.Disk.Nbd;

/// <summary>
/// The NBD stream is unusable: a peer broke the protocol (bad magic, absurd length, unknown
/// command, reply to a cookie nobody asked about) or closed mid-message. Retrying on the same
/// connection cannot help; the caller must drop both sides so QEMU fails the migration and the
/// guest keeps running on the source.
/// </summary>
public sealed class NbdProtocolException : Exception
{
    public NbdProtocolException(string message)
        : base(message)
    {
    }

    public NbdProtocolException(string message, Exception innerException)
        : base(message, innerException)
    {
    }

    public NbdProtocolException()
    {
    }

    /// <summary>Builds the message "where: what" with the stream offset of the offending message.</summary>
    public static NbdProtocolException At(string stream, long offset, string what) =>
        new($"NBD {stream} at byte {offset}: {what}");
}
