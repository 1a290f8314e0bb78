using BFMig.Native.Libvirt;

namespace BFMig.Native.Tests.Libvirt;

/// <summary>Binding tests against libvirt's in-process test driver (no daemon needed).</summary>
[Collection(LibvirtCollection.Name)]
public sealed class TestDriverTests
{
    internal const string DefaultUri = "test:///default";

    internal static string DomainXml(string name, string? uuid = null, bool withDisk = false) => $"""
        <domain type='test'>
          <name>{name}</name>
          {(uuid is null ? "" : $"<uuid>{uuid}</uuid>")}
          <memory unit='KiB'>65536</memory>
          <currentMemory unit='KiB'>65536</currentMemory>
          <vcpu>1</vcpu>
          <os><type arch='x86_64'>hvm</type></os>
          {(withDisk ? "<devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/nonexistent/bfmig.qcow2'/><target dev='vda' bus='virtio'/></disk></devices>" : "")}
        </domain>
        """;

    internal static string UniqueName(string prefix) => $"{prefix}-{Guid.NewGuid():N}"[..24];

    [Fact]
    public void Open_reports_uri_version_and_liveness()
    {
        using var conn = LibvirtConnection.Open(DefaultUri);
        Assert.Equal(DefaultUri, conn.Uri);
        Assert.True(conn.LibVersion >= 9_000_000, $"libvirt version {conn.LibVersion}");
        Assert.True(conn.IsAlive);
        Assert.False(string.IsNullOrEmpty(conn.Hostname));
        Assert.True(LibvirtEventLoop.IsRunning);
    }

    [Fact]
    public void Default_test_domain_is_listed_and_found_by_name_and_uuid()
    {
        using var conn = LibvirtConnection.Open(DefaultUri);
        var all = conn.ListAllDomains();
        try
        {
            LibvirtDomain test = Assert.Single(all, d => d.Name == "test");
            Assert.Matches("^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", test.Uuid);
            Assert.True(test.IsActive);
            Assert.True(test.IsPersistent);
            Assert.True(test.Id > 0);
            Assert.Equal(LibvirtDomainState.Running, test.GetState().State);

            using var byName = conn.LookupDomainByName("test");
            Assert.Equal(test.Uuid, byName.Uuid);
            using var byUuid = conn.LookupDomainByUuid(test.Uuid.ToUpperInvariant());
            Assert.Equal("test", byUuid.Name);

            var active = conn.ListAllDomains(LibvirtListDomainsFlags.Active);
            Assert.Contains(active, d => d.Name == "test");
            Assert.All(active, d => Assert.True(d.IsActive));
            foreach (var d in active)
            {
                d.Dispose();
            }
        }
        finally
        {
            foreach (var d in all)
            {
                d.Dispose();
            }
        }
    }

    [Fact]
    public void Missing_domain_raises_no_domain_with_libvirt_message()
    {
        using var conn = LibvirtConnection.Open(DefaultUri);
        var e = Assert.Throws<LibvirtException>(() => conn.LookupDomainByName("bfmig-no-such-domain"));
        Assert.Equal(LibvirtErrorCode.NoDomain, e.Code);
        Assert.Equal(42, (int)e.Code);
        Assert.Equal(LibvirtErrorDomain.Test, e.Domain);
        Assert.Equal("Domain not found", e.LibvirtMessage);
        Assert.Equal("LookupDomainByName", e.Operation);
        Assert.Null(conn.TryLookupDomainByName("bfmig-no-such-domain"));
        Assert.Null(conn.TryLookupDomainByUuid("00000000-0000-0000-0000-0000000000ff"));

        // The error was consumed: a following success leaves nothing behind, and a following
        // different failure reports its own code, not the stale one.
        using var test = conn.LookupDomainByName("test");
        var invalid = Assert.Throws<LibvirtException>(() => conn.DefineDomain("<domain><not-closed>"));
        Assert.Equal(LibvirtErrorCode.XmlDetail, invalid.Code);
    }

    [Fact]
    public void Open_of_unknown_driver_fails_with_libvirt_error()
    {
        var e = Assert.Throws<LibvirtException>(() => LibvirtConnection.Open("bfmig-nonexistent:///x"));
        Assert.NotEqual(LibvirtErrorCode.Ok, e.Code);
        Assert.False(string.IsNullOrWhiteSpace(e.LibvirtMessage));
    }

    [Fact]
    public void Define_start_suspend_resume_destroy_undefine_round_trip()
    {
        using var conn = LibvirtConnection.Open(DefaultUri);
        string name = UniqueName("bfmig-life");
        string uuid = Guid.NewGuid().ToString();
        using var dom = conn.DefineDomain(DomainXml(name, uuid));
        try
        {
            Assert.Equal(name, dom.Name);
            Assert.Equal(uuid, dom.Uuid);
            Assert.False(dom.IsActive);
            Assert.True(dom.IsPersistent);
            Assert.Equal(-1, dom.Id);
            Assert.Equal(LibvirtDomainState.Shutoff, dom.GetState().State);
            Assert.Contains(conn.ListAllDomains(LibvirtListDomainsFlags.Inactive), d => d.Name == name);

            dom.Start();
            Assert.True(dom.IsActive);
            Assert.Equal(LibvirtDomainState.Running, dom.GetState().State);
            dom.Suspend();
            Assert.Equal(LibvirtDomainState.Paused, dom.GetState().State);
            dom.Resume();
            Assert.Equal(LibvirtDomainState.Running, dom.GetState().State);
            var again = Assert.Throws<LibvirtException>(dom.Start);
            Assert.Contains("is already running", again.LibvirtMessage);
            dom.Destroy();
            Assert.False(dom.IsActive);
        }
        finally
        {
            dom.Undefine();
        }
        var gone = Assert.Throws<LibvirtException>(() => conn.LookupDomainByUuid(uuid));
        Assert.Equal(LibvirtErrorCode.NoDomain, gone.Code);
    }

    [Fact]
    public void Xml_survives_a_define_round_trip()
    {
        using var conn = LibvirtConnection.Open(DefaultUri);
        string name = UniqueName("bfmig-xml");
        using var dom = conn.DefineDomain(DomainXml(name));
        try
        {
            string xml = dom.GetXmlDesc(LibvirtDomainXmlFlags.Inactive);
            Assert.Contains($"<name>{name}</name>", xml);
            Assert.Contains($"<uuid>{dom.Uuid}</uuid>", xml);

            // Redefining with libvirt's own XML changes nothing.
            using var redefined = conn.DefineDomain(xml);
            Assert.Equal(dom.Uuid, redefined.Uuid);
            Assert.Equal(xml, redefined.GetXmlDesc(LibvirtDomainXmlFlags.Inactive));
        }
        finally
        {
            dom.Undefine();
        }
    }

    [Fact]
    public void Read_only_connection_reads_but_refuses_changes()
    {
        using var conn = LibvirtConnection.Open(DefaultUri, readOnly: true);
        using var test = conn.LookupDomainByName("test");
        Assert.Contains("<name>test</name>", test.GetXmlDesc());
        var e = Assert.Throws<LibvirtException>(() => conn.DefineDomain(DomainXml(UniqueName("bfmig-ro"))));
        Assert.Equal(LibvirtErrorCode.OperationDenied, e.Code);
        Assert.Equal(LibvirtErrorCode.OperationDenied, Assert.Throws<LibvirtException>(test.Suspend).Code);
    }

    [Fact]
    public void Transient_domain_disappears_when_destroyed()
    {
        using var conn = LibvirtConnection.Open(DefaultUri);
        string name = UniqueName("bfmig-trans");
        using var dom = conn.CreateTransientDomain(DomainXml(name));
        Assert.True(dom.IsActive);
        Assert.False(dom.IsPersistent);
        dom.Destroy();
        Assert.Null(conn.TryLookupDomainByName(name));
    }

    [Fact]
    public void Domain_handle_keeps_its_connection_alive_after_the_connection_is_disposed()
    {
        LibvirtDomain dom;
        using (var conn = LibvirtConnection.Open(DefaultUri))
        {
            dom = conn.LookupDomainByName("test");
        }
        using (dom)
        {
            Assert.Equal("test", dom.Name);
            Assert.Contains("<name>test</name>", dom.GetXmlDesc());
        }
    }

    [Fact]
    public void Job_stats_are_refused_by_the_test_driver_with_no_support()
    {
        // The real answer (job type None, then completed statistics) is covered against
        // libvirtd + QEMU in RealLibvirtdTests; the test driver does not implement the call.
        using var conn = LibvirtConnection.Open(DefaultUri);
        using var dom = conn.LookupDomainByName("test");
        var e = Assert.Throws<LibvirtException>(() => dom.GetJobStats());
        Assert.Equal(LibvirtErrorCode.NoSupport, e.Code);
        Assert.Contains("virDomainGetJobStats", e.LibvirtMessage);
        e = Assert.Throws<LibvirtException>(() => dom.GetJobStats(LibvirtJobStatsFlags.Completed | LibvirtJobStatsFlags.KeepCompleted));
        Assert.Equal(LibvirtErrorCode.NoSupport, e.Code);
    }

    [Fact]
    public void Migration_call_reaches_the_driver_with_typed_parameters()
    {
        using var conn = LibvirtConnection.Open(DefaultUri);
        using var dom = conn.LookupDomainByName("test");
        var parameters = new LibvirtMigrationParameters
        {
            MigrateUri = "unix:///run/bfmig/peer/test.mig",
            DisksUri = "unix:///run/bfmig/peer/test.nbd",
            MigrateDisks = ["vda", "vdb"],
            BandwidthMiBps = 100,
            ParallelConnections = 2,
        };
        // The test driver cannot migrate; libvirt must say so (not crash on our parameter array).
        var e = Assert.Throws<LibvirtException>(() => dom.MigrateToUri3("test:///default",
            parameters, LibvirtMigrateFlags.Live | LibvirtMigrateFlags.PeerToPeer));
        Assert.Equal(LibvirtErrorCode.ArgumentUnsupported, e.Code);
        Assert.Contains("p2p migration is not supported", e.LibvirtMessage);
        Assert.True(dom.IsActive);
    }

    [Fact]
    public void Managed_migration_over_two_connections_reaches_the_driver()
    {
        using var source = LibvirtConnection.Open(DefaultUri);
        using var destination = LibvirtConnection.Open(DefaultUri);
        using var dom = source.LookupDomainByName("test");
        // virt-manager's call. The test driver implements no migration protocol, so libvirt's
        // virDomainMigrate must get as far as asking both drivers and then say so (not crash on
        // our two handles, flags and null dname).
        var e = Assert.Throws<LibvirtException>(() => dom.Migrate(destination,
            LibvirtMigrateFlags.Live | LibvirtMigrateFlags.PersistDestination | LibvirtMigrateFlags.UndefineSource, "tcp://198.18.0.2"));
        Assert.Equal("Migrate", e.Operation);
        Assert.Equal(LibvirtErrorCode.NoSupport, e.Code);
        Assert.Contains("virDomainMigrate", e.LibvirtMessage);
        Assert.True(dom.IsActive);
        Assert.True(dom.IsPersistent);
        Assert.Throws<ArgumentNullException>(() => dom.Migrate(null!, LibvirtMigrateFlags.Live));
    }

    [Fact]
    public void Typed_parameters_round_trip_through_libvirt_allocation()
    {
        var input = new LibvirtMigrationParameters
        {
            MigrateUri = "unix:///x.mig",
            MigrateDisks = ["vda", "vdb"],
            BandwidthMiBps = 12345678901UL,
            ParallelConnections = -3,
            Extra = [new("some.uint", 7u), new("some.llong", -9L), new("some.double", 2.5), new("some.bool", true)],
        }.ToTypedParameters().ToArray();

        using var list = new Interop.Libvirt.TypedParameterList();
        foreach (var p in input)
        {
            list.Add(p);
        }
        Assert.Equal(input.Length, list.Count);
        LibvirtTypedParameter[] output;
        unsafe
        {
            output = Interop.Libvirt.ReadTypedParams(list.Pointer, list.Count);
        }
        Assert.Equal(input, output);
    }

    [Fact]
    public void Typed_parameter_with_an_over_long_name_is_refused_by_libvirt()
    {
        using var list = new Interop.Libvirt.TypedParameterList();
        var e = Assert.Throws<LibvirtException>(() => list.Add(new(new string('x', 100), 1)));
        Assert.NotEqual(LibvirtErrorCode.Ok, e.Code);
    }

    [Fact]
    public void Qemu_monitor_passthrough_is_refused_by_the_test_driver()
    {
        using var conn = LibvirtConnection.Open(DefaultUri);
        using var dom = conn.LookupDomainByName("test");
        var e = Assert.Throws<LibvirtException>(() => dom.QemuMonitorCommand("""{"execute":"query-status"}"""));
        Assert.Equal(LibvirtErrorCode.NoSupport, e.Code);
    }

    [Fact]
    public void Keepalive_is_not_available_on_a_local_driver()
    {
        using var conn = LibvirtConnection.Open(DefaultUri);
        Assert.False(conn.SetKeepAlive(5, 3));
        // The refused call left no stale error behind.
        using var test = conn.LookupDomainByName("test");
        Assert.Equal("test", test.Name);
    }
}

[CollectionDefinition(Name)]
public sealed class LibvirtCollection
{
    public const string Name = "libvirt";
}
