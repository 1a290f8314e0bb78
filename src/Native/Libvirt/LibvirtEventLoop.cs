namespace BFMig.Native.Libvirt;

/// <summary>
/// libvirt's default event loop on one dedicated background thread. Domain events, keepalive and
/// close callbacks only fire while it runs, and libvirt wants it registered before the first
/// connection is opened, so <see cref="LibvirtConnection.Open"/> starts it.
/// </summary>
public static class LibvirtEventLoop
{
    private static readonly Lock s_lock = new();
    private static Thread? s_thread;
    private static long s_iterations;

    /// <summary>True once the loop thread runs.</summary>
    public static bool IsRunning => s_thread is not null;

    /// <summary>How many loop iterations have completed (lets tests see that the loop turns).</summary>
    public static long Iterations => Interlocked.Read(ref s_iterations);

    /// <summary>Registers the default implementation (once per process) and starts the loop thread.</summary>
    public static void EnsureStarted()
    {
        if (s_thread is not null)
        {
            return;
        }
        lock (s_lock)
        {
            if (s_thread is not null)
            {
                return;
            }
            Interop.Libvirt.EventRegisterDefaultImpl();
            var thread = new Thread(Run) { IsBackground = true, Name = "libvirt-events" };
            thread.Start();
            s_thread = thread;
        }
    }

    private static void Run()
    {
        // The loop lives as long as the process: libvirt has no way to unregister the default implementation.
        while (true)
        {
            if (!Interop.Libvirt.EventRunDefaultImplOnce())
            {
                Thread.Sleep(100);
            }
            Interlocked.Increment(ref s_iterations);
        }
    }
}
