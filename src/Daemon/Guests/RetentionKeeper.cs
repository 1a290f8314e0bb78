using BFMig.Daemon.Logging;
using Microsoft.Extensions.Logging;

namespace BFMig.Daemon.Guests;

/// <summary>
/// Applies <see cref="RetentionLimits"/> to the host's retained guests: every
/// <see cref="RetentionLimits.Interval"/> and after every trip (<see cref="Request"/>). It only
/// chooses (<see cref="RetentionPolicy"/>); each eviction runs on the guest's own
/// <see cref="GuestSession"/>, which refuses while a trip is pending, and never while the guest's
/// streams run (<paramref name="busy"/>). One pass at a time; a request during a pass runs one more.
/// </summary>
/// <param name="store">The guests' state directories.</param>
/// <param name="sessions">Each guest's owner; every eviction runs on it.</param>
/// <param name="limits">What the host retains at most.</param>
/// <param name="busy">True while a transfer of the guest runs on this host.</param>
/// <param name="time">The clock (ages).</param>
/// <param name="logger">One line per evicted guest, with the reason.</param>
public sealed class RetentionKeeper(GuestStateStore store, GuestSessions sessions, RetentionLimits limits, Func<Guid, bool> busy,
    TimeProvider time, ILogger logger)
{
    private readonly SemaphoreSlim _requests = new(0, 1);
    private readonly Lock _gate = new();
    private Task _pass = Task.CompletedTask;

    /// <summary>The limits applied.</summary>
    public RetentionLimits Limits => limits;

    /// <summary>Checks every <see cref="RetentionLimits.Interval"/> and on every <see cref="Request"/> until <paramref name="ct"/> is cancelled.</summary>
    public async Task RunAsync(CancellationToken ct)
    {
        if (!limits.Any)
            return;
        DaemonLog.RetentionLimits(logger, limits.ToString(), limits.Interval.TotalMinutes);
        while (!ct.IsCancellationRequested)
        {
            await RunPassAsync().ConfigureAwait(false);
            using var tick = CancellationTokenSource.CreateLinkedTokenSource(ct);
            tick.CancelAfter(limits.Interval);
            try
            {
                await _requests.WaitAsync(tick.Token).ConfigureAwait(false);
            }
            catch (OperationCanceledException)
            {
                // The interval passed (or the daemon stops: the loop's condition tells).
            }
        }
    }

    /// <summary>Asks for a check soon (after a trip): several requests before it runs make one check.</summary>
    public void Request()
    {
        if (!limits.Any)
            return;
        lock (_gate)
        {
            if (_requests.CurrentCount == 0)
                _requests.Release();
        }
    }

    /// <summary>One check: chooses and evicts. Returns the evictions done (tests; the log has them too).</summary>
    public Task<IReadOnlyList<Eviction>> RunPassAsync()
    {
        lock (_gate)
        {
            var pass = _pass.ContinueWith(_ => PassAsync(), CancellationToken.None, TaskContinuationOptions.None, TaskScheduler.Default).Unwrap();
            _pass = pass;
            return pass;
        }
    }

    private async Task<IReadOnlyList<Eviction>> PassAsync()
    {
        var done = new List<Eviction>();
        try
        {
            var candidates = new List<RetentionCandidate>();
            foreach (var uuid in store.Uuids())
            {
                if (store.LastChanged(uuid) is not { } changed)
                    continue;
                candidates.Add(new RetentionCandidate(uuid, store.Cost(uuid), changed, ProtectedNow(uuid)));
            }
            foreach (var eviction in RetentionPolicy.Choose(candidates, limits, time.GetUtcNow()))
            {
                var session = sessions.Get(eviction.Uuid);
                var name = session.Name.Length > 0 ? session.Name : eviction.Uuid.ToString("D");
                // Checked again at the last moment: a trip may have started since the choice.
                if (busy(eviction.Uuid))
                {
                    DaemonLog.EvictionDeferred(logger, name, eviction.Uuid.ToString("D"), "a transfer of it is running");
                    continue;
                }
                try
                {
                    var freed = await session.EvictSnapshot().ConfigureAwait(false);
                    DaemonLog.Evicted(logger, name, eviction.Uuid.ToString("D"), freed, eviction.Reason);
                    done.Add(eviction with { Bytes = freed });
                }
                catch (Exception e) when (e is InvalidOperationException or IOException or UnauthorizedAccessException)
                {
                    DaemonLog.EvictionDeferred(logger, name, eviction.Uuid.ToString("D"), e.Message);
                }
            }
        }
        // Whatever one pass runs into (a record it cannot read, a bug), the next pass still comes: a
        // failure here must neither end retention for good nor stop the daemon (BfmigDaemon.Supervise),
        // which would come back to the same failure.
        catch (Exception e) when (!Failures.IsFatal(e))
        {
            DaemonLog.RetentionFailed(logger, e.Message);
        }
        return done;
    }

    private string? ProtectedNow(Guid uuid)
    {
        if (busy(uuid))
            return "a transfer of it is running";
        var (record, problem) = store.ReadLocation(uuid);
        return problem is not null ? "its location record " + problem : GuestSession.PendingTripText(record);
    }
}
