using System.Net.Sockets;
using BFMig.Daemon.Logging;
using BFMig.Daemon.Sockets;
using Microsoft.Extensions.Logging;

namespace BFMig.Daemon.Tests;

/// <summary>
/// The accept loop's rule for an error that waiting cannot clear (running out of descriptors is
/// <see cref="DaemonProcessTests.The_peer_port_outlives_running_out_of_descriptors"/>, on a real bfmigd).
/// </summary>
public sealed class AcceptLoopTests
{
    [Fact]
    public async Task An_error_waiting_cannot_clear_ends_the_loop_with_a_line_instead_of_retrying_forever()
    {
        // A listening TCP socket shut down: accept(2) answers EINVAL (no longer in LISTEN), every time.
        using var socket = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        socket.Bind(new System.Net.IPEndPoint(System.Net.IPAddress.Loopback, 0));
        socket.Listen(1);
        socket.Shutdown(SocketShutdown.Both);
        var log = new StringWriter();
        using (var loggers = DaemonLogging.Create("debug", log, underJournal: false))
        {
            var accepted = 0;
            var loop = AcceptLoop.RunAsync(socket, "test socket", loggers.CreateLogger("t"), c => { accepted++; c.Dispose(); }, CancellationToken.None);
            Assert.Same(loop, await Task.WhenAny(loop, Task.Delay(TimeSpan.FromSeconds(10))));
            Assert.Equal(0, accepted);
        }
        var text = log.ToString();
        Assert.Contains("accepting on the test socket failed: ", text, StringComparison.Ordinal);
        Assert.Contains("no longer accepting there", text, StringComparison.Ordinal);
        Assert.DoesNotContain("retrying in", text, StringComparison.Ordinal);
    }

    /// <summary>
    /// Only an error of the listening socket itself ends the loop. Running out of memory
    /// (ENOMEM, which .NET names only SocketError.SocketError, as it does EPROTO) or of
    /// descriptors is retried: before, any error not on a short list ended the loop, and a guest's
    /// socket or the peer port went dark on a passing shortage.
    /// </summary>
    [Theory]
    [InlineData(SocketError.SocketError, AcceptLoop.AcceptError.Retry)]
    [InlineData(SocketError.TooManyOpenSockets, AcceptLoop.AcceptError.Retry)]
    [InlineData(SocketError.NoBufferSpaceAvailable, AcceptLoop.AcceptError.Retry)]
    [InlineData(SocketError.AccessDenied, AcceptLoop.AcceptError.Retry)]
    [InlineData(SocketError.ConnectionAborted, AcceptLoop.AcceptError.PassOver)]
    [InlineData(SocketError.HostUnreachable, AcceptLoop.AcceptError.PassOver)]
    [InlineData(SocketError.InvalidArgument, AcceptLoop.AcceptError.Ends)]
    [InlineData(SocketError.NotSocket, AcceptLoop.AcceptError.Ends)]
    internal void Only_an_error_of_the_listening_socket_itself_ends_the_loop(SocketError error, AcceptLoop.AcceptError expected) =>
        Assert.Equal(expected, AcceptLoop.Judge(error));
}
