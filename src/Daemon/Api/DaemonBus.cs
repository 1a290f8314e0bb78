using BFMig.Bus;
using BFMig.Daemon.Logging;
using Microsoft.Extensions.Logging;
using Tmds.DBus.Protocol;

namespace BFMig.Daemon.Api;

/// <summary>
/// bfmigd's bus connection: exports <see cref="ManagerApi"/>, owns <see cref="ManagerApi.BusName"/>,
/// sends the Manager's signals and tells when the bus is gone (systemd then restarts the daemon:
/// a reconnected daemon would have lost the name and every caller's pending call anyway).
/// </summary>
public sealed class DaemonBus : IDisposable
{
    /// <summary>Connecting and taking the name; the bus daemon answers from memory.</summary>
    private static readonly TimeSpan StartTimeout = TimeSpan.FromSeconds(30);

    private readonly BusClient _client;
    private readonly ILogger _logger;
    private int _disposed;

    private DaemonBus(BusClient client, ILogger logger)
    {
        _client = client;
        _logger = logger;
    }

    /// <summary>
    /// Connects to the bus at <paramref name="address"/> (null: the system bus), exports
    /// <paramref name="api"/> and takes the name (refused if another process owns it). Calls
    /// <paramref name="lost"/> once, from the thread pool, with the reason when the connection ends
    /// other than by <see cref="Dispose"/>.
    /// </summary>
    public static DaemonBus Open(string? address, ManagerApi api, ILogger logger, Action<string> lost)
    {
        var client = BusClient.Connect(address, StartTimeout);
        try
        {
            var connection = client.Connection;
            connection.AddMethodHandler(api);
            connection.RequestNameAsync(ManagerApi.BusName, RequestNameOptions.None).WaitAsync(StartTimeout).GetAwaiter().GetResult();
            var bus = new DaemonBus(client, logger);
            _ = connection.DisconnectedAsync().ContinueWith(t =>
            {
                if (Volatile.Read(ref bus._disposed) == 0)
                    lost(t.Result?.Message ?? "the connection ended");
            }, TaskScheduler.Default);
            return bus;
        }
        catch
        {
            client.Dispose();
            throw;
        }
    }

    /// <summary>TransferProgress(guest, peer, stream, bytes_sent, bytes_saved).</summary>
    public void TransferProgress(string guest, string peer, string stream, ulong sent, ulong saved) =>
        Emit("TransferProgress", "ssstt", (ref MessageWriter w) =>
        {
            w.WriteString(guest);
            w.WriteString(peer);
            w.WriteString(stream);
            w.WriteUInt64(sent);
            w.WriteUInt64(saved);
        });

    /// <summary>TransferFinished(guest, peer, ok, message).</summary>
    public void TransferFinished(string guest, string peer, bool ok, string message) =>
        Emit("TransferFinished", "ssbs", (ref MessageWriter w) =>
        {
            w.WriteString(guest);
            w.WriteString(peer);
            w.WriteBool(ok);
            w.WriteString(message);
        });

    /// <summary>A lost signal costs a progress line, never a transfer: failures are logged and dropped.</summary>
    private void Emit(string member, string signature, BodyWriter write)
    {
        try
        {
            var writer = _client.Connection.GetMessageWriter();
            try
            {
                writer.WriteSignalHeader(null, ManagerApi.ObjectPath, ManagerApi.InterfaceName, member, signature);
                write(ref writer);
                if (!_client.Connection.TrySendMessage(writer.CreateMessage()))
                    DaemonLog.MethodFailed(_logger, member, "the bus connection is closed");
            }
            finally
            {
                writer.Dispose();
            }
        }
        catch (Exception e) when (e is DBusExceptionBase or ObjectDisposedException)
        {
            DaemonLog.MethodFailed(_logger, member, e.Message);
        }
    }

    public void Dispose()
    {
        Volatile.Write(ref _disposed, 1);
        _client.Dispose();
    }
}
