namespace BFMig.Daemon;

/// <summary>Runs an action on the first <see cref="Dispose"/> only: the end of a scope handed to a caller's <c>using</c>.</summary>
internal sealed class DisposeAction(Action action) : IDisposable
{
    private int _disposed;

    /// <inheritdoc/>
    public void Dispose()
    {
        if (Interlocked.Exchange(ref _disposed, 1) == 0)
            action();
    }
}
