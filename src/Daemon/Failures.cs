namespace BFMig.Daemon;

/// <summary>The one rule for what a background piece may log and carry on after.</summary>
internal static class Failures
{
    /// <summary>
    /// True when the process cannot work at all (a library that cannot be loaded, memory): the
    /// libvirt watcher's per-event catch and retention's per-pass catch let these through, so they
    /// end that piece and reach <c>BfmigDaemon.Supervise</c>, which stops the daemon. Anything else
    /// in one event or one pass (a bug, a record that cannot be read) is logged, and the next one
    /// still comes. (A connection's own handler catches everything: it closes that connection.)
    /// </summary>
    public static bool IsFatal(Exception e) =>
        e is OutOfMemoryException or DllNotFoundException or EntryPointNotFoundException or TypeInitializationException;
}
