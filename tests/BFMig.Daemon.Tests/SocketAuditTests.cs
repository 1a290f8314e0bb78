using BFMig.Daemon.Guests;

namespace BFMig.Daemon.Tests;

/// <summary>
/// The audit's confirmation rule alone, on a clock the test moves (the daemon's audit on the test
/// driver is <see cref="MigrationSocketsTests"/>): a difference counts once it has lasted the
/// confirmation time, each difference on its own.
/// </summary>
public sealed class SocketAuditTests
{
    private static readonly (Guid, string) A = (Guid.NewGuid(), "a"), B = (Guid.NewGuid(), "b"), C = (Guid.NewGuid(), "c");

    [Fact]
    public void A_difference_that_clears_before_its_confirmation_is_never_reported()
    {
        var audit = new SocketAudit(TimeSpan.FromSeconds(30));
        // A guest listed as running before its Started event arrived: pending, nothing to do.
        var first = audit.Compare([A, B], [A], 0);
        Assert.Empty(first.Missing);
        Assert.True(first.Pending);
        // Its event came and gave it sockets.
        var second = audit.Compare([A, B], [A, B], 5_000);
        Assert.Empty(second.Missing);
        Assert.False(second.Pending);
        // The same difference much later starts its own wait: not confirmed by the first sighting.
        Assert.Empty(audit.Compare([A, B], [A], 60_000).Missing);
        Assert.Empty(audit.Compare([A, B], [A], 85_000).Missing);
        Assert.Equal([B], audit.Compare([A, B], [A], 90_000).Missing);
    }

    [Fact]
    public void A_lasting_difference_is_reported_once_though_other_guests_come_and_go_beside_it()
    {
        var audit = new SocketAudit(TimeSpan.FromSeconds(30));
        // B's sockets outlived B (its Stopped event missed); C comes and goes in the meantime.
        Assert.Empty(audit.Compare([A], [A, B], 0).Stale);
        Assert.Empty(audit.Compare([A, C], [A, B], 10_000).Stale);
        Assert.Empty(audit.Compare([A, C], [A, B, C], 20_000).Stale);
        var confirmed = audit.Compare([A], [A, B], 30_000);
        Assert.Equal([B], confirmed.Stale);
        Assert.Empty(confirmed.Missing);
        Assert.False(confirmed.Pending);
        // Reported, then forgotten: were it to last (the correction failed), it waits again.
        Assert.Empty(audit.Compare([A], [A, B], 35_000).Stale);
    }

    [Fact]
    public void A_reset_forgets_what_waited_for_confirmation()
    {
        var audit = new SocketAudit(TimeSpan.FromSeconds(30));
        Assert.True(audit.Compare([A, B], [A], 0).Pending);
        audit.Reset();
        Assert.Empty(audit.Compare([A, B], [A], 40_000).Missing);
        Assert.Equal([B], audit.Compare([A, B], [A], 70_000).Missing);
    }
}
