using System.ComponentModel;
using System.Runtime.InteropServices;
using System.Text;

namespace BFMig.Native.Processes;

/// <summary>
/// A child started with <c>posix_spawn</c>, so that chosen open descriptors (an accepted
/// migration socket, a peer connection) land in chosen slots of the child (3, 4, ...).
/// System.Diagnostics.Process can only hand over stdin/stdout/stderr, as pipes.
/// Descriptors not mapped are not inherited: .NET opens everything close-on-exec.
/// </summary>
public sealed class ChildProcess
{
    private readonly Task<int> _exit;

    private ChildProcess(int pid)
    {
        Pid = pid;
        // One blocking waitpid per child on its own thread: children are few (one per stream),
        // and the .NET runtime only reaps the children it started itself.
        _exit = Task.Factory.StartNew(() => WaitForExit(pid), CancellationToken.None, TaskCreationOptions.LongRunning, TaskScheduler.Default);
    }

    /// <summary>The child's process id.</summary>
    public int Pid { get; }

    /// <summary>Completes with the exit code, or 128 + signal number when the child was killed.</summary>
    public Task<int> Exited => _exit;

    /// <summary>
    /// Starts <paramref name="path"/> with <paramref name="args"/> (argv[0] is the path).
    /// <paramref name="descriptors"/> maps a descriptor of ours to its number in the child, e.g.
    /// (socket.Handle, 3). stdin is /dev/null; stdout and stderr are shared with us unless mapped.
    /// </summary>
    public static unsafe ChildProcess Start(string path, IReadOnlyList<string> args, IReadOnlyList<(int Ours, int Theirs)> descriptors, IReadOnlyDictionary<string, string>? environment = null)
    {
        ArgumentException.ThrowIfNullOrEmpty(path);
        // dup2 runs in order: a source that is also another mapping's target would be clobbered.
        foreach (var (ours, theirs) in descriptors)
        {
            if (theirs < 0 || descriptors.Any(d => d.Theirs == ours && d.Ours != ours))
                throw new ArgumentException($"descriptor mapping {ours}->{theirs} overlaps another mapping", nameof(descriptors));
        }
        var actions = Marshal.AllocHGlobal(Interop.Spawn.OpaqueSize);
        var attr = Marshal.AllocHGlobal(Interop.Spawn.OpaqueSize);
        var sigset = Marshal.AllocHGlobal(Interop.Spawn.OpaqueSize);
        var argv = new NativeStringArray([path, .. args]);
        var envp = new NativeStringArray(EnvironmentEntries(environment));
        try
        {
            Check(Interop.Spawn.FileActionsInit(actions), "posix_spawn_file_actions_init");
            Check(Interop.Spawn.AttrInit(attr), "posix_spawnattr_init");
            try
            {
                Check(Interop.Spawn.FileActionsAddOpen(actions, 0, "/dev/null", Interop.Spawn.O_RDWR, 0), "posix_spawn_file_actions_addopen");
                foreach (var (ours, theirs) in descriptors)
                    Check(Interop.Spawn.FileActionsAddDup2(actions, ours, theirs), $"posix_spawn_file_actions_adddup2({ours}, {theirs})");
                var firstUnmapped = Math.Max(3, descriptors.Count == 0 ? 3 : descriptors.Max(d => d.Theirs) + 1);
                Check(Interop.Spawn.FileActionsAddCloseFrom(actions, firstUnmapped), "posix_spawn_file_actions_addclosefrom_np");
                // The runtime blocks and handles signals on its own threads; the child must start
                // with every signal at its default disposition and none blocked.
                Interop.Spawn.SigEmptySet(sigset);
                Check(Interop.Spawn.AttrSetSigMask(attr, sigset), "posix_spawnattr_setsigmask");
                Interop.Spawn.SigFillSet(sigset);
                Check(Interop.Spawn.AttrSetSigDefault(attr, sigset), "posix_spawnattr_setsigdefault");
                Check(Interop.Spawn.AttrSetFlags(attr, Interop.Spawn.POSIX_SPAWN_SETSIGMASK | Interop.Spawn.POSIX_SPAWN_SETSIGDEF), "posix_spawnattr_setflags");
                var rc = Interop.Spawn.PosixSpawn(out var pid, path, actions, attr, argv.Pointer, envp.Pointer);
                if (rc != 0)
                    throw new Win32Exception(rc, $"cannot start {path}: {new Win32Exception(rc).Message}");
                return new ChildProcess(pid);
            }
            finally
            {
                Interop.Spawn.FileActionsDestroy(actions);
                Interop.Spawn.AttrDestroy(attr);
            }
        }
        finally
        {
            Marshal.FreeHGlobal(actions);
            Marshal.FreeHGlobal(attr);
            Marshal.FreeHGlobal(sigset);
            argv.Dispose();
            envp.Dispose();
        }
    }

    /// <summary>Sends a signal (15 = SIGTERM, 9 = SIGKILL); a child that already exited is not an error.</summary>
    public void Signal(int signal)
    {
        if (!_exit.IsCompleted && Interop.Spawn.Kill(Pid, signal) != 0 && Marshal.GetLastPInvokeError() != 3 /* ESRCH */)
            throw new Win32Exception(Marshal.GetLastPInvokeError(), $"kill({Pid}, {signal}) failed");
    }

    private static int WaitForExit(int pid)
    {
        while (true)
        {
            if (Interop.Spawn.WaitPid(pid, out var status, 0) == pid)
            {
                var signal = status & 0x7f;
                return signal == 0 ? (status >> 8) & 0xff : 128 + signal;
            }
            var errno = Marshal.GetLastPInvokeError();
            if (errno != Interop.Spawn.EINTR)
                throw new Win32Exception(errno, $"waitpid({pid}) failed");
        }
    }

    /// <summary>"NAME=VALUE" of <paramref name="environment"/>, or of this process when null.</summary>
    internal static List<string> EnvironmentEntries(IReadOnlyDictionary<string, string>? environment)
    {
        if (environment is not null)
            return [.. environment.Select(kv => $"{kv.Key}={kv.Value}")];
        var entries = new List<string>();
        foreach (System.Collections.DictionaryEntry e in Environment.GetEnvironmentVariables())
            entries.Add($"{e.Key}={e.Value}");
        return entries;
    }

    private static void Check(int rc, string what)
    {
        if (rc != 0)
            throw new Win32Exception(rc, $"{what} failed: {new Win32Exception(rc).Message}");
    }
}
