using System.Net.Sockets;
using System.Runtime.InteropServices;
using BFMig.Daemon.Configuration;
using BFMig.Daemon.Logging;
using BFMig.Native;
using BFMig.Native.Systemd;
using Microsoft.Extensions.Logging;
using Tmds.DBus.Protocol;

namespace BFMig.Daemon;

/// <summary>
/// <c>bfmigd [--config FILE] [--state-dir DIR] [--daemon:KEY=VALUE ...]</c>. Exit codes: 0 stopped
/// on request, 1 failed while running (bus lost, cannot start), 2 bad configuration (the message
/// names the key and where it was set).
/// </summary>
internal static class Program
{
    private const string Usage = """
        usage: bfmigd [--config FILE] [--state-dir DIR] [--runtime-dir DIR] [--libvirt-uri URI]
                      [--listen HOST:PORT] [--host-name NAME] [--log-level LEVEL] [--bus-address ADDRESS]
                      [--SECTION:KEY=VALUE ...]
        Settings come from FILE (default /etc/bfmig/bfmig.conf), BFMIG_SECTION__KEY environment
        variables and the command line, in rising precedence; see bfmig.conf(5).
        """;

    private static async Task<int> Main(string[] args)
    {
        if (args is ["--version"])
        {
            Console.WriteLine($"bfmigd {BuildInfo.Version}");
            return 0;
        }
        if (args is ["--help"] or ["-h"])
        {
            Console.Write(Usage);
            return 0;
        }
        DaemonOptions options;
        try
        {
            var (configPath, rest) = SplitConfigArgument(args);
            options = DaemonConfiguration.Load(DaemonConfiguration.Build(configPath, rest));
        }
        catch (ConfigurationException e)
        {
            Console.Error.WriteLine($"bfmigd: {e.Message}");
            return 2;
        }
        using var loggers = DaemonLogging.Create(options.LogLevel);
        var logger = loggers.CreateLogger("bfmigd");
        var daemon = new BfmigDaemon(options, loggers);
        try
        {
            daemon.Start();
        }
        catch (ConfigurationException e)
        {
            DaemonLog.StartFailed(logger, e.Message, null);
            Console.Error.WriteLine($"bfmigd: {e.Message}");
            await daemon.StopAsync("start failed");
            return 2;
        }
        catch (Exception e) when (e is DBusExceptionBase or TimeoutException or IOException or SocketException or UnauthorizedAccessException)
        {
            DaemonLog.StartFailed(logger, e.Message, e);
            Console.Error.WriteLine($"bfmigd: cannot start: {e.Message}");
            await daemon.StopAsync("start failed");
            return 1;
        }

        var requested = 0;
        void OnSignal(PosixSignalContext context)
        {
            // The runtime must not terminate the process: the daemon stops in order, transfers first.
            context.Cancel = true;
            if (Interlocked.Exchange(ref requested, 1) != 0)
                return;
            TryNotify(() => SystemdNotify.Stopping());
            TryNotify(() => SystemdNotify.Status("stopping: letting running transfers finish"));
            _ = daemon.StopAsync(context.Signal.ToString());
        }
        using var term = PosixSignalRegistration.Create(PosixSignal.SIGTERM, OnSignal);
        using var interrupt = PosixSignalRegistration.Create(PosixSignal.SIGINT, OnSignal);
        // The unit's ExecReload sends SIGHUP, whose default action would end the daemon mid-transfer.
        using var hangup = PosixSignalRegistration.Create(PosixSignal.SIGHUP, context =>
        {
            context.Cancel = true;
            DaemonLog.ReloadIgnored(logger);
        });

        var status = $"host {options.HostName}, {options.Peers.Count} peers, data port {daemon.PeerPort}";
        DaemonLog.Ready(logger, status);
        TryNotify(() => SystemdNotify.Ready());
        TryNotify(() => SystemdNotify.Status(status));
        await daemon.Completion;
        return Volatile.Read(ref requested) == 1 ? 0 : 1;
    }

    /// <summary>Takes <c>--config FILE</c> (or <c>--config=FILE</c>) out of the arguments; the rest are settings.</summary>
    internal static (string? Path, string[] Remaining) SplitConfigArgument(string[] args)
    {
        string? path = null;
        var rest = new List<string>();
        for (var i = 0; i < args.Length; i++)
        {
            if (args[i] == "--config")
            {
                if (i + 1 >= args.Length)
                    throw new ConfigurationException("--config needs a file name");
                path = args[++i];
            }
            else if (args[i].StartsWith("--config=", StringComparison.Ordinal))
            {
                path = args[i]["--config=".Length..];
            }
            else
            {
                rest.Add(args[i]);
            }
        }
        return (path, [.. rest]);
    }

    private static void TryNotify(Func<bool> notify)
    {
        try
        {
            notify();
        }
        catch (IOException)
        {
            // systemd gone or NOTIFY_SOCKET stale: the daemon works the same without it.
        }
    }
}
