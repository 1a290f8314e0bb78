using System.Buffers.Binary;
using System.Net.Sockets;
using BFMig.Daemon.Transfers;

namespace BFMig.Daemon.Transparent;

/// <summary>What QEMU's first bytes (or its silence) say a redirected connection carries.</summary>
public enum SniffedStream
{
    /// <summary>QEMU's migration stream ("QEVM"): the client speaks first.</summary>
    Memory,

    /// <summary>Silence: an NBD client waits for the server's greeting (the disk mirror).</summary>
    ServerFirst,

    /// <summary>A multifd channel (magic 0x11223344): carried by a helper pair like the main stream.</summary>
    Multifd,

    /// <summary>A TLS ClientHello (QEMU native TLS): encrypted, carried byte for byte.</summary>
    Tls,

    /// <summary>Anything else: carried byte for byte.</summary>
    Unknown,

    /// <summary>QEMU closed the connection before sending anything.</summary>
    Closed,

    /// <summary>
    /// Silence on the port a memory stream of the same guest still goes to (the interceptor tells,
    /// not the bytes): QEMU's post-copy preempt channel, carried straight to the peer's QEMU.
    /// </summary>
    PreemptChannel,
}

/// <summary>
/// Tells a redirected connection's stream kind without consuming a byte (MSG_PEEK): QEMU's
/// migration client writes its header as soon as it connects, while QEMU's NBD client never
/// speaks before the server's greeting. A connection that stays silent for the wait is the NBD
/// one (or, on the port of the guest's running memory stream, QEMU's post-copy preempt channel:
/// the interceptor decides that, with no wait at all once that stream is armed for post-copy and
/// the guest's QEMU held the connection at the first look);
/// a migration client slower than that would reach the NBD path, which fails the migration
/// cleanly (the guest stays on the source), so the wait errs on the long side.
/// </summary>
public static class StreamSniffer
{
    private const uint QemuFileMagic = 0x5145564d; // "QEVM"
    private const uint MultifdMagic = 0x11223344;
    private const byte TlsHandshakeRecord = 0x16;

    // With no wait: how long a connection that has sent fewer than 4 bytes may take to complete its magic.
    private static readonly TimeSpan ShortSegmentWait = TimeSpan.FromMilliseconds(100);

    /// <summary>Classifies from the bytes seen so far (at least one).</summary>
    public static SniffedStream Classify(ReadOnlySpan<byte> first)
    {
        if (first.IsEmpty)
            return SniffedStream.Closed;
        if (first[0] == TlsHandshakeRecord)
            return SniffedStream.Tls;
        if (first.Length < 4)
            return SniffedStream.Unknown;
        return BinaryPrimitives.ReadUInt32BigEndian(first) switch
        {
            QemuFileMagic => SniffedStream.Memory,
            MultifdMagic => SniffedStream.Multifd,
            _ => SniffedStream.Unknown,
        };
    }

    /// <summary>
    /// Waits up to <paramref name="silence"/> for QEMU's first bytes and classifies them; nothing
    /// is consumed. With no wait, a connection with nothing to read yet is silent at once; one
    /// that has bytes (or its close) is classified by them, a short first segment waited out as
    /// with a wait.
    /// </summary>
    public static async Task<(SniffedStream Kind, TimeSpan FirstBytesAfter)> SniffAsync(Socket socket, TimeSpan silence, CancellationToken ct)
    {
        var started = System.Diagnostics.Stopwatch.StartNew();
        var buffer = new byte[4];
        if (silence <= TimeSpan.Zero)
        {
            if (!socket.Poll(0, SelectMode.SelectRead))
                return (SniffedStream.ServerFirst, started.Elapsed);
            silence = ShortSegmentWait;
        }
        var deadline = started.Elapsed + silence;
        while (true)
        {
            var left = deadline - started.Elapsed;
            int got = left <= TimeSpan.Zero ? -1 : await PeerListener.PeekAsync(socket, buffer, DateTime.UtcNow + left, ct).ConfigureAwait(false);
            if (got < 0)
                return (SniffedStream.ServerFirst, started.Elapsed);
            // QEMU writes its 4-byte magic in one go; a shorter first segment is waited out briefly.
            if (got == 0 || got >= 4 || buffer[0] == TlsHandshakeRecord)
                return (Classify(buffer.AsSpan(0, got)), started.Elapsed);
            await Task.Delay(5, ct).ConfigureAwait(false);
            if (started.Elapsed > deadline)
                return (Classify(buffer.AsSpan(0, got)), started.Elapsed);
        }
    }
}
