using System.Diagnostics;
using BFMig.Native.Libvirt;

namespace BFMig.Native.Tests.Libvirt;

/// <summary>
/// Bindings against a real libvirtd running a small TCG QEMU guest (no kernel: it sits in the
/// firmware, which is enough for QMP, checkpoints and job statistics).
/// </summary>
[Collection(LibvirtCollection.Name)]
public sealed class RealLibvirtdTests(LibvirtdFixture fixture, ITestOutputHelper output) : IClassFixture<LibvirtdFixture>
{
    private bool Available => Prerequisite.Require(fixture.Instance.StartError is null, $"a private libvirtd ({fixture.Instance.StartError})", output);

    private static string GuestXml(string name, string disk) => $"""
        <domain type='qemu'>
          <name>{name}</name>
          <memory unit='MiB'>64</memory>
          <vcpu>1</vcpu>
          <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
          <devices>
            <emulator>/usr/bin/qemu-system-x86_64</emulator>
            <disk type='file' device='disk'>
              <driver name='qemu' type='qcow2'/>
              <source file='{disk}'/>
              <target dev='vda' bus='virtio'/>
            </disk>
            <memballoon model='none'/>
          </devices>
        </domain>
        """;

    private static string NewDisk()
    {
        DirectoryInfo dir = Directory.CreateTempSubdirectory("bfmig-lv-");
        File.SetUnixFileMode(dir.FullName, (UnixFileMode)0b111_101_101);
        string disk = Path.Combine(dir.FullName, "disk.qcow2");
        using var p = Process.Start("qemu-img", ["create", "-q", "-f", "qcow2", disk, "16M"]);
        p.WaitForExit();
        Assert.Equal(0, p.ExitCode);
        return disk;
    }

    private static string BlockNodes(LibvirtDomain dom) =>
        dom.QemuMonitorCommand("""{"execute":"query-named-block-nodes","arguments":{"flat":true}}""").Replace(" ", "");

    private static async Task<LibvirtLifecycleDomainEvent> NextAsync(LibvirtDomainEventSubscription events, string name, LibvirtLifecycleEvent wanted)
    {
        using var timeout = new CancellationTokenSource(TimeSpan.FromSeconds(60));
        while (true)
        {
            if (await events.Events.ReadAsync(timeout.Token) is LibvirtLifecycleDomainEvent e && e.DomainName == name && e.Event == wanted)
            {
                return e;
            }
        }
    }

    [Fact]
    public async Task Running_guest_events_job_stats_qmp_and_checkpoints()
    {
        if (!Available)
        {
            return;
        }
        string disk = NewDisk();
        using var conn = LibvirtConnection.Open(fixture.Instance.Uri);
        Assert.True(conn.SetKeepAlive(5, 3), "remote connections support keepalive");
        using var events = conn.SubscribeDomainEvents();
        string name = TestDriverTests.UniqueName("bfmig-real");
        using var dom = conn.DefineDomain(GuestXml(name, disk));
        try
        {
            dom.Start();
            LibvirtLifecycleDomainEvent started = await NextAsync(events, name, LibvirtLifecycleEvent.Started);
            Assert.Equal(dom.Uuid, started.DomainUuid);
            Assert.Equal(LibvirtDomainState.Running, dom.GetState().State);

            // No job runs: type None, and no completed-job statistics kept yet.
            LibvirtJobStats stats = dom.GetJobStats();
            Assert.Equal(LibvirtJobType.None, stats.Type);
            Assert.Equal(LibvirtJobType.None, dom.GetJobStats(LibvirtJobStatsFlags.Completed | LibvirtJobStatsFlags.KeepCompleted).Type);

            string status = dom.QemuMonitorCommand("""{"execute":"query-status"}""");
            Assert.Contains("\"status\":\"running\"", status.Replace(" ", ""));
            Assert.Contains("running", dom.QemuMonitorCommand("info status", humanMonitor: true));
            // A QMP-level error is QEMU's answer, passed back as JSON, not a libvirt failure.
            Assert.Contains("CommandNotFound", dom.QemuMonitorCommand("""{"execute":"bfmig-no-such-command"}"""));
            var notJson = Assert.Throws<LibvirtException>(() => dom.QemuMonitorCommand("this is not json"));
            Assert.Equal(LibvirtErrorCode.InternalError, notJson.Code);
            // libvirt 9.0 says "cannot parse json", 11.3 "failed to parse JSON".
            Assert.Contains("json", notJson.LibvirtMessage, StringComparison.OrdinalIgnoreCase);

            using (var c1 = dom.CreateCheckpoint("<domaincheckpoint><name>c1</name></domaincheckpoint>"))
            using (var c2 = dom.CreateCheckpoint("<domaincheckpoint><name>c2</name></domaincheckpoint>"))
            {
                string xml = c2.GetXmlDesc();
                Assert.Contains("<name>c2</name>", xml);
                Assert.Contains("checkpoint='bitmap'", xml);
                using (var parent = c2.GetParent())
                {
                    Assert.Equal("c1", parent?.Name);
                }
                // The bitmaps exist in QEMU, seen through our QMP passthrough.
                string nodes = BlockNodes(dom);
                Assert.Contains("\"name\":\"c1\"", nodes);
                Assert.Contains("\"name\":\"c2\"", nodes);

                // Forget the metadata only (the bitmap stays), then redefine it, as after a migration.
                c2.Delete(LibvirtCheckpointDeleteFlags.MetadataOnly);
                Assert.Equal(["c1"], dom.ListAllCheckpoints().Select(c => c.Name));
                Assert.Contains("\"name\":\"c2\"", BlockNodes(dom));
                using var redefined = dom.CreateCheckpoint(xml, LibvirtCheckpointCreateFlags.Redefine);
                Assert.Equal(["c1", "c2"], dom.ListAllCheckpoints(LibvirtCheckpointListFlags.Topological).Select(c => c.Name));
                Assert.Equal(LibvirtErrorCode.NoDomainCheckpoint,
                    Assert.Throws<LibvirtException>(() => dom.LookupCheckpoint("c3")).Code);

                c1.Delete(LibvirtCheckpointDeleteFlags.Children);
                Assert.Empty(dom.ListAllCheckpoints());
                Assert.DoesNotContain("\"name\":\"c1\"", BlockNodes(dom));
            }

            dom.Destroy();
            await NextAsync(events, name, LibvirtLifecycleEvent.Stopped);
        }
        finally
        {
            if (dom.IsActive)
            {
                dom.Destroy();
            }
            dom.Undefine(LibvirtUndefineFlags.CheckpointsMetadata);
            Directory.Delete(Path.GetDirectoryName(disk)!, recursive: true);
        }
    }

    [Fact]
    public async Task Losing_libvirtd_raises_closed_and_later_calls_fail_with_a_connection_error()
    {
        using var own = new LibvirtdInstance();
        if (!Prerequisite.Require(own.StartError is null, $"a private libvirtd ({own.StartError})", output))
        {
            return;
        }
        using var conn = LibvirtConnection.Open(own.Uri);
        var closed = new TaskCompletionSource<LibvirtCloseReason>(TaskCreationOptions.RunContinuationsAsynchronously);
        conn.Closed += reason => closed.TrySetResult(reason);
        Assert.True(conn.IsAlive);
        own.KillDaemon();
        LibvirtCloseReason why = await closed.Task.WaitAsync(TimeSpan.FromSeconds(30));
        Assert.Contains(why, new[] { LibvirtCloseReason.Eof, LibvirtCloseReason.Error, LibvirtCloseReason.Keepalive });
        Assert.False(conn.IsAlive);
        var e = Assert.Throws<LibvirtException>(() => conn.ListAllDomains());
        Assert.Contains(e.Code, new[] { LibvirtErrorCode.InternalError, LibvirtErrorCode.Rpc, LibvirtErrorCode.NoConnect, LibvirtErrorCode.InvalidConnection });
        output.WriteLine($"closed: {why}; next call: {e.Message}");
    }
}
