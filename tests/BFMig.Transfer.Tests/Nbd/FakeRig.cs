using BFMig.Tests.Shared.Nbd;
using BFMig.Transfer.Disk.Nbd;
using BFMig.Transfer.Disk;


namespace BFMig.Transfer.Tests.Nbd;

internal sealed record RigResult(
    NbdFilterResult? Result,
    Exception? FilterError,
    Exception? ScriptError,
    NbdFilterStats Stats,
    DiskBlockMap Recorded,
    DiskBlockMap Observed);

/// <summary>Client script -> NbdSenderFilter -> (observer tap) -> FakeNbdServer, all over unix socket pairs, with a timeout.</summary>
internal static class FakeRig
{
    public static async Task<RigResult> RunAsync(FakeNbdServer server, IDiskBlockView retained, NbdClientOptions options, Func<NbdClient, CancellationToken, Task> script, int timeoutSeconds = 20)
    {
        var (clientSide, filterClient) = await SocketPair.CreateAsync();
        var (filterUp, serverSide) = await SocketPair.CreateAsync();
        var recorded = new DiskBlockMap(retained.ImageSize, retained.BlockSize, retained.HashKey);
        var observed = new DiskBlockMap(retained.ImageSize, retained.BlockSize, retained.HashKey);
        var observer = new NbdStreamObserver(retained);
        var filter = new NbdSenderFilter(new NbdSenderFilterOptions { DrainTimeout = TimeSpan.FromSeconds(5) });
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(timeoutSeconds));
        var ct = cts.Token;
        var serverTask = Task.Run(() => server.RunAsync(serverSide, ct), ct);
        var filterTask = Task.Run(() => filter.RunAsync(filterClient, new TapStream(filterUp, observer), retained, recorded, ct), ct);
        Exception? scriptError = null;
        try
        {
            await using var client = await NbdClient.ConnectAsync(clientSide, options, ct);
            await script(client, ct);
        }
        catch (Exception e)
        {
            scriptError = e;
        }
        NbdFilterResult? result = null;
        Exception? filterError = null;
        try
        {
            // The client is done: a real QEMU closes its socket after DISC (or instead of it).
            clientSide.Socket.Shutdown(scriptError is null ? System.Net.Sockets.SocketShutdown.Send : System.Net.Sockets.SocketShutdown.Both);
            result = await filterTask.WaitAsync(ct);
        }
        catch (Exception e)
        {
            filterError = e;
        }
        observer.Report(observed);
        await clientSide.DisposeAsync();
        await filterClient.DisposeAsync();
        await filterUp.DisposeAsync();
        await serverSide.DisposeAsync();
        try
        {
            await serverTask.WaitAsync(TimeSpan.FromSeconds(5));
        }
        catch (Exception)
        {
            // The server only loses its peer here.
        }
        return new RigResult(result, filterError, scriptError, filter.Stats, recorded, observed);
    }

    /// <summary>A retained map describing <paramref name="disk"/> exactly.</summary>
    public static DiskBlockMap MapOf(byte[] disk, int blockSize, DiskHashKey? key = null)
    {
        var map = new DiskBlockMap((ulong)disk.Length, blockSize, key);
        for (long b = 0; b < map.BlockCount; b++)
        {
            int len = DiskBlockHash.BlockLength(b, (ulong)disk.Length, blockSize);
            map.Set(b, DiskBlockHash.Compute(disk.AsSpan((int)(b * blockSize), len), map.HashKey));
        }
        return map;
    }
}
