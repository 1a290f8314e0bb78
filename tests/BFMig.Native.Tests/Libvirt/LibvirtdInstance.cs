using System.Diagnostics;

namespace BFMig.Native.Tests.Libvirt;

/// <summary>
/// A real libvirtd + virtlogd in a private mount namespace (own /run, /var/lib/libvirt, /etc/libvirt/qemu
/// on tmpfs), so it touches neither the host's state nor other libvirtds. Reached through
/// /proc/PID/root. Everything it started is killed by pid on Dispose.
/// </summary>
public sealed class LibvirtdInstance : IDisposable
{
    private readonly Process? _process;
    private readonly string? _namespace;
    private readonly DirectoryInfo? _configDirectory;

    /// <param name="hostUuid">libvirtd's host_uuid; two instances need different ones to migrate between them.</param>
    public LibvirtdInstance(string? hostUuid = null)
    {
        if (!File.Exists("/usr/sbin/libvirtd") || !File.Exists("/usr/sbin/virtlogd"))
        {
            StartError = "libvirtd/virtlogd are not installed";
            return;
        }
        string config = "";
        if (hostUuid is not null)
        {
            _configDirectory = Directory.CreateTempSubdirectory("bfmig-libvirtd-");
            config = Path.Combine(_configDirectory.FullName, "libvirtd.conf");
            File.WriteAllText(config, $"host_uuid = \"{hostUuid}\"\n");
        }
        string script = $"""
            set -e
            {(config.Length == 0 ? "" : $"mount --bind {config} /etc/libvirt/libvirtd.conf")}
            mount -t tmpfs tmpfs /run
            mount -t tmpfs tmpfs /var/lib/libvirt
            mount -t tmpfs tmpfs /var/log/libvirt
            mount -t tmpfs tmpfs /var/cache/libvirt
            mount -t tmpfs tmpfs /etc/libvirt/qemu
            mkdir -p /run/libvirt
            virtlogd -d
            exec libvirtd
            """;
        var start = new ProcessStartInfo("unshare", ["-m", "--propagation", "private", "sh", "-c", script])
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
        };
        _process = Process.Start(start);
        if (_process is null)
        {
            StartError = "could not start unshare";
            return;
        }
        _process.OutputDataReceived += (_, _) => { };
        _process.ErrorDataReceived += (_, _) => { };
        _process.BeginOutputReadLine();
        _process.BeginErrorReadLine();
        string socket = $"/proc/{_process.Id}/root/run/libvirt/libvirt-sock";
        var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(30);
        while (!File.Exists(socket))
        {
            if (_process.HasExited || DateTime.UtcNow > deadline)
            {
                _namespace = MountNamespace(_process.Id);
                StartError = _process.HasExited ? $"libvirtd exited with {_process.ExitCode}" : "libvirtd socket did not appear within 30 s";
                Dispose();
                return;
            }
            Thread.Sleep(100);
        }
        Uri = $"qemu+unix:///system?socket={socket}";
        Pid = _process.Id;
        _namespace = MountNamespace(Pid);
    }

    /// <summary>Why libvirtd is not available (null when it runs).</summary>
    public string? StartError { get; }

    public string Uri { get; } = "";

    public int Pid { get; }

    /// <summary>The end of a guest's QEMU log in this instance's private /var/log (for failure messages).</summary>
    public string QemuLog(string guest)
    {
        try
        {
            string text = File.ReadAllText($"/proc/{Pid}/root/var/log/libvirt/qemu/{guest}.log");
            return text.Length <= 4000 ? text : text[^4000..];
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            return $"(no log: {e.Message})";
        }
    }

    /// <summary>Kills libvirtd (and only it), to see what clients notice.</summary>
    public void KillDaemon()
    {
        if (_process is { HasExited: false })
        {
            _process.Kill();
            _process.WaitForExit(10_000);
        }
    }

    public void Dispose()
    {
        if (_process is null)
        {
            return;
        }
        // Everything still in libvirtd's mount namespace (virtlogd, QEMU) goes with it. Processes
        // come and go on a shared machine while we scan, so every step tolerates a vanished pid.
        string? ns = _namespace ?? MountNamespace(_process.Id);
        KillDaemon();
        for (int pass = 0; ns is not null && pass < 3; pass++)
        {
            int[] members = Directory.EnumerateDirectories("/proc").Select(Path.GetFileName)
                .Select(n => int.TryParse(n, out int p) ? p : 0)
                .Where(p => p > 1 && p != Environment.ProcessId && MountNamespace(p) == ns).ToArray();
            if (members.Length == 0)
            {
                break;
            }
            foreach (int pid in members)
            {
                try
                {
                    using var other = Process.GetProcessById(pid);
                    other.Kill();
                    other.WaitForExit(10_000);
                }
                catch (Exception)
                {
                    // Already gone.
                }
            }
        }
        _process.Dispose();
        _configDirectory?.Delete(recursive: true);
    }

    private static string? MountNamespace(int pid)
    {
        try
        {
            return new FileInfo($"/proc/{pid}/ns/mnt").LinkTarget;
        }
        catch (Exception)
        {
            return null;
        }
    }
}

public sealed class LibvirtdFixture : IDisposable
{
    public LibvirtdInstance Instance { get; } = new();

    public void Dispose() => Instance.Dispose();
}
