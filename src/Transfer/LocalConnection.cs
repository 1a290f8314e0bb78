using System.Net.Sockets;
using BFMig.Native.Linux;

namespace BFMig.Transfer;

/// <summary>The connection to the local QEMU (or qemu-nbd): a stream, and the socket when there is one (for half-close).</summary>
public sealed class LocalConnection : IAsyncDisposable
{
    public LocalConnection(Stream stream, Socket? socket)
    {
        Stream = stream;
        Socket = socket;
    }

    /// <summary>Wraps a connected socket.</summary>
    public static LocalConnection FromSocket(Socket socket) => new(new NetworkStream(socket, ownsSocket: true), socket);

    public Stream Stream { get; }
    public Socket? Socket { get; }

    /// <summary>Bytes readable now without blocking (0 when unknown).</summary>
    public int Available
    {
        get
        {
            try
            {
                return Socket?.Available ?? 0;
            }
            catch (ObjectDisposedException)
            {
                return 0;
            }
        }
    }

    /// <summary>Tells the local side no more bytes will come (shutdown(SHUT_WR)); the other direction stays open.</summary>
    public void HalfClose()
    {
        try
        {
            Socket?.Shutdown(SocketShutdown.Send);
        }
        catch (SocketException)
        {
        }
        catch (ObjectDisposedException)
        {
        }
    }

    /// <summary>What the kernel may queue for a source helper reading its QEMU's memory stream (<see cref="LimitReadQueue"/>).</summary>
    public const int SourceReadQueue = 256 << 10;

    /// <summary>
    /// Caps the bytes the kernel queues for this end to read (SO_RCVBUF; TCP only). Left to
    /// autotuning, a loopback socket from the source QEMU grows to several MiB that the helper has
    /// not read yet, because the pacer holds it back (<see cref="StreamPacer"/>): stream QEMU counts
    /// as sent and the pacer cannot see, all of it still to cross the link after the guest stops.
    /// Lab, first trip at 100 Mbit/s: 2.9-3.2 MB here on top of QEMU's own 4 MiB send queue
    /// (`ss`), downtime 617-1744 ms against stock's 394-480. QEMU's send queue still keeps the
    /// helper fed; each read just takes less.
    /// </summary>
    public void LimitReadQueue(int bytes)
    {
        if (Socket is not { } s || !UnixSockets.IsTcp(s)) return;
        try
        {
            s.ReceiveBufferSize = bytes;
        }
        catch (SocketException)
        {
            // Refused: the stream still flows, with the kernel's queue.
        }
    }

    private const int GatedPiece = 64 << 10;
    private LoadGate? _gate;
    private bool _gateTried;

    /// <summary>
    /// Writes <paramref name="data"/> in pieces, each only once the local end has loaded all but a
    /// few milliseconds' worth of what it was given (<see cref="LoadGate"/>); returns how long it
    /// waited. A plain write completes once the bytes sit in the reader's receive queue, which the
    /// kernel grows up to <c>tcp_rmem</c>'s maximum (32 MiB on the lab's hosts): a destination QEMU
    /// must load all of it before it serves anything else, the mirror's FLUSH at the switchover
    /// included (lab, 1 Gbit/s: 20-24 MiB queued when the guest paused), and the receiver's
    /// progress reports, which pace the sender, counted it as loaded. Unix sockets (small, fixed
    /// buffers) and peers the kernel cannot name are written to as they are.
    /// </summary>
    /// <remarks>
    /// The bytes carry <paramref name="load"/> (<see cref="Wire.ProgressMessage.Load"/>; their
    /// length where nothing weighs more than its bytes), taken as spread evenly over them: pieces
    /// are cut to carry at most <see cref="GatedPiece"/> of load each.
    /// </remarks>
    public async ValueTask<TimeSpan> WriteGatedAsync(ReadOnlyMemory<byte> data, long load, CancellationToken ct)
    {
        if (!_gateTried)
        {
            _gateTried = true;
            _gate = Socket is not null && TcpPeerQueue.For(Socket) is { } queue ? new LoadGate(queue) : null;
        }
        if (_gate is null)
        {
            await Stream.WriteAsync(data, ct);
            return TimeSpan.Zero;
        }
        var waited = TimeSpan.Zero;
        int piece = (int)Math.Clamp(GatedPiece * (double)data.Length / Math.Max(load, 1), 1, GatedPiece);
        long loadDone = 0;
        for (int done = 0; done < data.Length;)
        {
            int n = Math.Min(data.Length - done, piece);
            long upTo = done + n == data.Length ? load : (long)((double)load * (done + n) / data.Length);
            waited += await _gate.WaitAsync(upTo - loadDone, ct);
            await Stream.WriteAsync(data.Slice(done, n), ct);
            _gate.Wrote(n, upTo - loadDone);
            done += n;
            loadDone = upTo;
        }
        return waited;
    }

    public ValueTask DisposeAsync()
    {
        _gate?.Dispose();
        return Stream.DisposeAsync();
    }
}
