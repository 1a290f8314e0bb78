using System.Net;
using System.Net.Sockets;

namespace BFMig.Transfer.Tests.Nbd;

/// <summary>
/// Stands between the receiving helper and a real NBD server and, on <see cref="ResetAsync"/>,
/// stops forwarding in both directions, waits until the helper has nothing more to send, and
/// resets the helper's connection (TCP RST): what the helper sees when the destination QEMU dies
/// with data still unread, and the source's mirror waits for replies that will never come.
/// </summary>
internal sealed class ResettingProxy : IAsyncDisposable
{
    private static readonly TimeSpan Quiet = TimeSpan.FromMilliseconds(300);
    private readonly Socket _listener = new(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
    private readonly CancellationTokenSource _stop = new();
    private Socket? _helper;
    private Socket? _server;
    private Task _pumps = Task.CompletedTask;
    private volatile bool _forwarding = true;
    private long _lastFromHelper = Environment.TickCount64;

    /// <summary>Connects to the server at <paramref name="unixPath"/> and returns the helper's end, a TCP socket on loopback.</summary>
    public async Task<Socket> ConnectAsync(string unixPath, CancellationToken ct)
    {
        _listener.Bind(new IPEndPoint(IPAddress.Loopback, 0));
        _listener.Listen(1);
        _server = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        await _server.ConnectAsync(new UnixDomainSocketEndPoint(unixPath), ct);
        var helperEnd = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        var accept = _listener.AcceptAsync(ct).AsTask();
        await helperEnd.ConnectAsync((IPEndPoint)_listener.LocalEndPoint!, ct);
        _helper = await accept;
        _pumps = Task.WhenAll(PumpAsync(_helper, _server, fromHelper: true), PumpAsync(_server, _helper, fromHelper: false));
        return helperEnd;
    }

    /// <summary>Stops forwarding, waits for the helper to go quiet, and resets its connection.</summary>
    public async Task ResetAsync(CancellationToken ct)
    {
        _forwarding = false;
        while (Environment.TickCount64 - Interlocked.Read(ref _lastFromHelper) < Quiet.TotalMilliseconds)
            await Task.Delay(20, ct);
        _helper!.LingerState = new LingerOption(true, 0);
        _helper.Close();
    }

    private async Task PumpAsync(Socket from, Socket to, bool fromHelper)
    {
        var buffer = new byte[64 << 10];
        try
        {
            while (true)
            {
                int n = await from.ReceiveAsync(buffer, SocketFlags.None, _stop.Token);
                if (n == 0) return;
                if (fromHelper)
                    Interlocked.Exchange(ref _lastFromHelper, Environment.TickCount64);
                if (_forwarding)
                    await to.SendAsync(buffer.AsMemory(0, n), SocketFlags.None, _stop.Token);
            }
        }
        catch (Exception e) when (e is SocketException or ObjectDisposedException or OperationCanceledException)
        {
            // The reset, or the end of the test.
        }
    }

    public async ValueTask DisposeAsync()
    {
        await _stop.CancelAsync();
        _helper?.Dispose();
        _server?.Dispose();
        await _pumps;
        _listener.Dispose();
        _stop.Dispose();
    }
}
