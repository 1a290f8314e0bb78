using System.Net;
using System.Net.Sockets;

namespace BFMig.Transfer.Tests.Nbd;

/// <summary>
/// Stands between the receiving helper and a real NBD server. It forwards the helper's first
/// <c>forwardLimit</c> bytes (so the handshake and the first write get through) and drops the
/// rest, and from then on forwards nothing back; <see cref="ResetAsync"/> waits for that point
/// and for the helper to have nothing more to send, and resets the helper's connection (TCP RST):
/// what the helper sees when the destination QEMU dies with data still unread, while the source's
/// mirror waits for replies that will never come. Deterministic: it does not depend on timing.
/// </summary>
internal sealed class ResettingProxy(long forwardLimit) : IAsyncDisposable
{
    private static readonly TimeSpan Quiet = TimeSpan.FromMilliseconds(300);
    private readonly Socket _listener = new(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
    private readonly CancellationTokenSource _stop = new();
    private Socket? _helper;
    private Socket? _server;
    private Task _pumps = Task.CompletedTask;
    private volatile bool _forwarding = true;
    private long _fromHelper;
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

    /// <summary>Waits until forwarding stopped and the helper went quiet, then resets its connection.</summary>
    public async Task ResetAsync(CancellationToken ct)
    {
        while (_forwarding || Environment.TickCount64 - Interlocked.Read(ref _lastFromHelper) < Quiet.TotalMilliseconds)
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
                int forward = n;
                if (fromHelper)
                {
                    Interlocked.Exchange(ref _lastFromHelper, Environment.TickCount64);
                    long before = _fromHelper;
                    _fromHelper += n;
                    forward = (int)Math.Clamp(forwardLimit - before, 0, n);
                    if (_fromHelper >= forwardLimit)
                        _forwarding = false;
                }
                else if (!_forwarding)
                    forward = 0;
                if (forward > 0)
                    await to.SendAsync(buffer.AsMemory(0, forward), SocketFlags.None, _stop.Token);
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
