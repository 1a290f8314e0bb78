using System.Diagnostics;
using System.Net.Sockets;
using BFMig.Transfer.Disk.Nbd;

namespace BFMig.Tests.Shared.Nbd;

/// <summary>
/// A <c>qemu-nbd</c> process serving one image on a private unix socket, stopped (by its pid)
/// on dispose: the tests' destination NBD server and their way to read images
/// (<see cref="DiskBlockMapBuilder"/>).
/// </summary>
public sealed class QemuNbdServer : IAsyncDisposable
{
    private readonly Process _process;

    private QemuNbdServer(Process process, string socketPath)
    {
        _process = process;
        SocketPath = socketPath;
    }

    /// <summary>The unix socket qemu-nbd listens on.</summary>
    public string SocketPath { get; }

    /// <summary>Process id of qemu-nbd.</summary>
    public int ProcessId => _process.Id;

    /// <summary>
    /// Starts <c>qemu-nbd -k SOCKET -f FORMAT ... IMAGE</c> and waits until the socket accepts.
    /// <paramref name="extraArguments"/> go before the image (e.g. "-r", "--cache=none", "--discard=unmap").
    /// </summary>
    public static async Task<QemuNbdServer> StartAsync(string imagePath, string format, string socketPath, IEnumerable<string> extraArguments, TimeSpan timeout, CancellationToken ct)
    {
        var psi = new ProcessStartInfo("qemu-nbd")
        {
            RedirectStandardError = true,
            RedirectStandardOutput = true,
            UseShellExecute = false,
        };
        psi.ArgumentList.Add("-k");
        psi.ArgumentList.Add(socketPath);
        psi.ArgumentList.Add("-f");
        psi.ArgumentList.Add(format);
        psi.ArgumentList.Add("--persistent");
        foreach (string a in extraArguments)
            psi.ArgumentList.Add(a);
        psi.ArgumentList.Add(imagePath);
        var process = Process.Start(psi) ?? throw new IOException("qemu-nbd did not start");
        var server = new QemuNbdServer(process, socketPath);
        var stderr = process.StandardError.ReadToEndAsync(ct);
        var deadline = DateTime.UtcNow + timeout;
        try
        {
            while (true)
            {
                if (process.HasExited)
                    throw new IOException($"qemu-nbd exited with {process.ExitCode}: {await stderr}");
                if (File.Exists(socketPath))
                {
                    try
                    {
                        using var probe = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
                        await probe.ConnectAsync(new UnixDomainSocketEndPoint(socketPath), ct);
                        return server;
                    }
                    catch (SocketException)
                    {
                    }
                }
                if (DateTime.UtcNow > deadline)
                    throw new TimeoutException($"qemu-nbd did not listen on {socketPath} within {timeout}");
                await Task.Delay(20, ct);
            }
        }
        catch
        {
            await server.DisposeAsync();
            throw;
        }
    }

    /// <summary>Opens a new connection to the server.</summary>
    public async Task<NetworkStream> ConnectAsync(CancellationToken ct)
    {
        var socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        try
        {
            await socket.ConnectAsync(new UnixDomainSocketEndPoint(SocketPath), ct);
            return new NetworkStream(socket, ownsSocket: true);
        }
        catch
        {
            socket.Dispose();
            throw;
        }
    }

    /// <summary>Stops qemu-nbd (SIGKILL to its pid) and removes the socket.</summary>
    public async ValueTask DisposeAsync()
    {
        try
        {
            if (!_process.HasExited)
            {
                _process.Kill();
                using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(10));
                await _process.WaitForExitAsync(cts.Token);
            }
        }
        catch (InvalidOperationException)
        {
        }
        _process.Dispose();
        try
        {
            File.Delete(SocketPath);
        }
        catch (IOException)
        {
        }
    }
}
