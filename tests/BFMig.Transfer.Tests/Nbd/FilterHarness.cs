using System.Net.Sockets;
using System.Text.Json.Nodes;
using BFMig.Transfer.Disk.Nbd;
using BFMig.Transfer.Disk;
using Xunit;

namespace BFMig.Transfer.Tests.Nbd;

/// <summary>A stream wrapper reporting what passes: reads and writes (the receiver's tap, trace capture).</summary>
internal sealed class TapStream(Stream inner, Action<ReadOnlySpan<byte>> onRead, Action<ReadOnlySpan<byte>> onWrite) : Stream
{
    /// <summary>Feeds an observer: written bytes come from the client, read bytes from the server.</summary>
    public TapStream(Stream inner, NbdStreamObserver observer)
        : this(inner, observer.OnServerBytes, observer.OnClientBytes)
    {
    }

    public override bool CanRead => true;
    public override bool CanSeek => false;
    public override bool CanWrite => true;
    public override long Length => throw new NotSupportedException();
    public override long Position { get => throw new NotSupportedException(); set => throw new NotSupportedException(); }

    public override void Flush() => inner.Flush();

    public override Task FlushAsync(CancellationToken cancellationToken) => inner.FlushAsync(cancellationToken);

    public override int Read(byte[] buffer, int offset, int count) => throw new NotSupportedException();

    public override async ValueTask<int> ReadAsync(Memory<byte> buffer, CancellationToken cancellationToken = default)
    {
        int n = await inner.ReadAsync(buffer, cancellationToken);
        onRead(buffer.Span[..n]);
        return n;
    }

    public override async ValueTask WriteAsync(ReadOnlyMemory<byte> buffer, CancellationToken cancellationToken = default)
    {
        onWrite(buffer.Span);
        await inner.WriteAsync(buffer, cancellationToken);
    }

    public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();

    public override void SetLength(long value) => throw new NotSupportedException();

    public override void Write(byte[] buffer, int offset, int count) => throw new NotSupportedException();
}

/// <summary>
/// Listens on a unix socket like bfmigd's <c>/run/bfmig/PEER/GUEST.nbd</c>, accepts the QEMU NBD
/// client, connects upstream, and runs <see cref="NbdSenderFilter"/> between them, with the
/// receiver's observer tapping the upstream side.
/// </summary>
internal sealed class FilterHarness : IAsyncDisposable
{
    private readonly Socket _listener;
    private readonly Task<NbdFilterResult> _run;
    private readonly Action<bool, byte[]>? _capture;

    public FilterHarness(string socketPath, Func<CancellationToken, Task<Stream>> connectUpstream, IDiskBlockView retained, CancellationToken ct, NbdSenderFilterOptions? options = null, Action<bool, byte[]>? capture = null)
    {
        _capture = capture;
        SocketPath = socketPath;
        Filter = new NbdSenderFilter(options);
        Recorded = new DiskBlockMap(retained.ImageSize == 0 ? 1 : retained.ImageSize, retained.BlockSize, retained.HashKey);
        ObserverMap = new DiskBlockMap(retained.ImageSize == 0 ? 1 : retained.ImageSize, retained.BlockSize, retained.HashKey);
        Observer = new NbdStreamObserver(retained);
        _listener = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        _listener.Bind(new UnixDomainSocketEndPoint(socketPath));
        _listener.Listen(1);
        _run = RunAsync(connectUpstream, retained, ct);
    }

    public string SocketPath { get; }

    public NbdSenderFilter Filter { get; }

    public DiskBlockMap Recorded { get; }

    public NbdStreamObserver Observer { get; }

    public DiskBlockMap ObserverMap { get; }

    public Task<NbdFilterResult> Completion => _run;

    private async Task<NbdFilterResult> RunAsync(Func<CancellationToken, Task<Stream>> connectUpstream, IDiskBlockView retained, CancellationToken ct)
    {
        using var clientSocket = await _listener.AcceptAsync(ct);
        await using var clientNet = new NetworkStream(clientSocket, ownsSocket: false);
        Stream client = _capture is { } capture
            ? new TapStream(clientNet, b => capture(true, b.ToArray()), b => capture(false, b.ToArray()))
            : clientNet;
        await using var upstream = await connectUpstream(ct);
        var tapped = new TapStream(upstream, Observer);
        try
        {
            return await Filter.RunAsync(client, tapped, retained, Recorded, ct);
        }
        finally
        {
            Observer.Report(ObserverMap);
            clientSocket.Shutdown(SocketShutdown.Both);
        }
    }

    public async ValueTask DisposeAsync()
    {
        _listener.Dispose();
        try
        {
            await _run.WaitAsync(TimeSpan.FromSeconds(5));
        }
        catch (Exception)
        {
            // Reported by the test that awaited Completion.
        }
        File.Delete(SocketPath);
    }
}

/// <summary>Drives a real QEMU mirror job (blockdev-mirror sync=full) into an NBD socket, as libvirt's --copy-storage-all does.</summary>
internal static class Mirror
{
    public static async Task RunAsync(string qemuBinary, string sourceImage, string nbdSocket, string exportName, bool discardUnmap, string qmpSocket, CancellationToken ct,
        string format = "qcow2")
    {
        await using var qmp = await QemuQmp.StartAsync(qemuBinary, qmpSocket, ct);
        await qmp.ExecuteAsync("blockdev-add", new JsonObject
        {
            ["driver"] = format,
            ["node-name"] = "src",
            ["file"] = new JsonObject { ["driver"] = sourceImage.StartsWith("/dev/", StringComparison.Ordinal) ? "host_device" : "file", ["filename"] = sourceImage },
        }, ct);
        var target = new JsonObject
        {
            ["driver"] = "nbd",
            ["node-name"] = "tgt",
            ["server"] = new JsonObject { ["type"] = "unix", ["path"] = nbdSocket },
            ["export"] = exportName,
        };
        if (discardUnmap)
            target["discard"] = "unmap";
        await qmp.ExecuteAsync("blockdev-add", target, ct);
        await qmp.ExecuteAsync("blockdev-mirror", new JsonObject
        {
            ["job-id"] = "m",
            ["device"] = "src",
            ["target"] = "tgt",
            ["sync"] = "full",
        }, ct);
        var ready = await qmp.WaitEventAsync("BLOCK_JOB_READY", ct, "BLOCK_JOB_COMPLETED", "BLOCK_JOB_ERROR");
        if (ready["event"]!.GetValue<string>() != "BLOCK_JOB_READY")
            throw new InvalidOperationException("mirror failed: " + ready.ToJsonString());
        // libvirt ends a storage migration with block-job-cancel in the ready state (no pivot).
        await qmp.ExecuteAsync("block-job-cancel", new JsonObject { ["device"] = "m" }, ct);
        var done = await qmp.WaitEventAsync("BLOCK_JOB_COMPLETED", ct, "BLOCK_JOB_CANCELLED");
        if (done["data"]?["error"] is JsonNode error)
            throw new InvalidOperationException("mirror ended with error: " + error.ToJsonString());
        await qmp.ExecuteAsync("blockdev-del", new JsonObject { ["node-name"] = "tgt" }, ct);
    }
}
