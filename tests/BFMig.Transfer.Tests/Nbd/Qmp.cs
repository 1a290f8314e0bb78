using Xunit;
using System.Diagnostics;
using System.Net.Sockets;
using System.Text;
using System.Text.Json.Nodes;

namespace BFMig.Transfer.Tests.Nbd;

/// <summary>
/// A QEMU process without a guest (<c>-machine none</c>, TCG, no devices) driven over QMP,
/// used the way libvirt drives block jobs: blockdev-add, blockdev-mirror, nbd-server-start.
/// </summary>
internal sealed class QemuQmp : IAsyncDisposable
{
    private readonly Process _process;
    private readonly Socket _socket;
    private readonly StreamReader _reader;
    private readonly Stream _stream;
    private readonly List<JsonObject> _events = [];
    private int _id;

    private QemuQmp(Process process, Socket socket)
    {
        _process = process;
        _socket = socket;
        _stream = new NetworkStream(socket, ownsSocket: false);
        _reader = new StreamReader(_stream, Encoding.UTF8);
    }

    public IReadOnlyList<JsonObject> Events => _events;

    public static async Task<QemuQmp> StartAsync(string binary, string qmpSocket, CancellationToken ct)
    {
        var psi = new ProcessStartInfo(binary) { UseShellExecute = false, RedirectStandardError = true, RedirectStandardOutput = true };
        foreach (string a in new[] { "-machine", "none", "-nodefaults", "-display", "none", "-accel", "tcg", "-qmp", $"unix:{qmpSocket},server=on,wait=off" })
            psi.ArgumentList.Add(a);
        var process = Process.Start(psi)!;
        _ = process.StandardOutput.ReadToEndAsync(CancellationToken.None);
        var stderr = process.StandardError.ReadToEndAsync(CancellationToken.None);
        var deadline = DateTime.UtcNow.AddSeconds(20);
        while (true)
        {
            if (process.HasExited)
                throw new InvalidOperationException($"{binary} exited {process.ExitCode}: {await stderr}");
            var socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
            try
            {
                await socket.ConnectAsync(new UnixDomainSocketEndPoint(qmpSocket), ct);
                var qmp = new QemuQmp(process, socket);
                await qmp.ReadMessageAsync(ct);
                await qmp.ExecuteAsync("qmp_capabilities", null, ct);
                return qmp;
            }
            catch (SocketException)
            {
                socket.Dispose();
                if (DateTime.UtcNow > deadline)
                {
                    process.Kill();
                    throw new TimeoutException("QMP socket did not appear");
                }
                await Task.Delay(50, ct);
            }
        }
    }

    public int ProcessId => _process.Id;

    private async Task<JsonObject> ReadMessageAsync(CancellationToken ct)
    {
        string? line = await _reader.ReadLineAsync(ct) ?? throw new IOException("QMP closed");
        return JsonNode.Parse(line)!.AsObject();
    }

    /// <summary>Runs a command; throws on a QMP error.</summary>
    public async Task<JsonNode?> ExecuteAsync(string command, JsonObject? arguments, CancellationToken ct)
    {
        var message = new JsonObject { ["execute"] = command, ["id"] = ++_id };
        if (arguments is not null)
            message["arguments"] = arguments;
        byte[] bytes = Encoding.UTF8.GetBytes(message.ToJsonString() + "\n");
        await _stream.WriteAsync(bytes, ct);
        while (true)
        {
            var reply = await ReadMessageAsync(ct);
            if (reply.ContainsKey("event"))
            {
                _events.Add(reply);
                continue;
            }
            if (reply["error"] is JsonNode error)
                throw new InvalidOperationException($"QMP {command} failed: {error.ToJsonString()}");
            return reply["return"];
        }
    }

    /// <summary>Waits for an event with the given name (and optional matching "data.device").</summary>
    public async Task<JsonObject> WaitEventAsync(string name, CancellationToken ct, params string[] alternatives)
    {
        while (true)
        {
            foreach (var e in _events)
            {
                string ev = e["event"]!.GetValue<string>();
                if (ev == name || alternatives.Contains(ev))
                {
                    _events.Remove(e);
                    return e;
                }
            }
            var message = await ReadMessageAsync(ct);
            if (message.ContainsKey("event"))
                _events.Add(message);
        }
    }

    public async ValueTask DisposeAsync()
    {
        try
        {
            if (!_process.HasExited)
            {
                using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(5));
                try
                {
                    await ExecuteAsync("quit", null, cts.Token);
                    await _process.WaitForExitAsync(cts.Token);
                }
                catch (Exception)
                {
                    // Killed below.
                }
            }
        }
        finally
        {
            if (!_process.HasExited)
                _process.Kill();
            _reader.Dispose();
            _stream.Dispose();
            _socket.Dispose();
            _process.Dispose();
        }
    }
}

/// <summary>The destination side of a real migration: a QEMU exporting a writable qcow2 over its own NBD server.</summary>
internal static class QemuDestination
{
    public const string ExportName = "disk";

    public static async Task<QemuQmp> StartAsync(string qemu, string image, string nbdSocket, string qmpSocket, CancellationToken ct)
    {
        var destination = await QemuQmp.StartAsync(qemu, qmpSocket, ct);
        try
        {
            await destination.ExecuteAsync("blockdev-add", new JsonObject
            {
                ["driver"] = "qcow2",
                ["node-name"] = "dst",
                ["file"] = new JsonObject { ["driver"] = "file", ["filename"] = image },
            }, ct);
            await destination.ExecuteAsync("nbd-server-start", new JsonObject
            {
                ["addr"] = new JsonObject { ["type"] = "unix", ["data"] = new JsonObject { ["path"] = nbdSocket } },
            }, ct);
            await destination.ExecuteAsync("block-export-add", new JsonObject
            {
                ["type"] = "nbd",
                ["id"] = "e",
                ["node-name"] = "dst",
                ["name"] = ExportName,
                ["writable"] = true,
            }, ct);
            return destination;
        }
        catch
        {
            await destination.DisposeAsync();
            throw;
        }
    }
}
