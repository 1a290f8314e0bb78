using BFMig.Native.Libvirt;

namespace BFMig.Native.Tests.Libvirt;

/// <summary>Checkpoint bindings against the test driver (which implements checkpoint metadata).</summary>
[Collection(LibvirtCollection.Name)]
public sealed class CheckpointTests
{
    private static string CheckpointXml(string name) => $"<domaincheckpoint><name>{name}</name><description>bfmig test</description></domaincheckpoint>";

    [Fact]
    public void Checkpoints_are_created_listed_parented_deleted_and_redefined()
    {
        using var conn = LibvirtConnection.Open(TestDriverTests.DefaultUri);
        using var dom = conn.DefineDomain(TestDriverTests.DomainXml(TestDriverTests.UniqueName("bfmig-ckpt"), withDisk: true));
        try
        {
            dom.Start();
            using var first = dom.CreateCheckpoint(CheckpointXml("c1"));
            using var second = dom.CreateCheckpoint(CheckpointXml("c2"));
            Assert.Equal("c1", first.Name);
            Assert.Equal("c2", second.Name);

            var all = dom.ListAllCheckpoints(LibvirtCheckpointListFlags.Topological);
            Assert.Equal(["c1", "c2"], all.Select(c => c.Name));
            foreach (var c in all)
            {
                c.Dispose();
            }
            var roots = dom.ListAllCheckpoints(LibvirtCheckpointListFlags.Roots);
            Assert.Equal("c1", Assert.Single(roots).Name);
            roots[0].Dispose();

            using (LibvirtCheckpoint? parent = second.GetParent())
            {
                Assert.NotNull(parent);
                Assert.Equal("c1", parent.Name);
            }
            Assert.Null(first.GetParent());

            string xml = second.GetXmlDesc();
            Assert.Contains("<name>c2</name>", xml);
            Assert.Contains("<parent>", xml);
            Assert.Contains("<name>c1</name>", xml);

            // What BFMig does across a migration: forget the metadata, then redefine it from XML.
            second.Delete(LibvirtCheckpointDeleteFlags.MetadataOnly);
            var missing = Assert.Throws<LibvirtException>(() => dom.LookupCheckpoint("c2"));
            Assert.Equal(LibvirtErrorCode.NoDomainCheckpoint, missing.Code);

            using (var redefined = dom.CreateCheckpoint(xml, LibvirtCheckpointCreateFlags.Redefine))
            {
                Assert.Equal("c2", redefined.Name);
                using var redefinedParent = redefined.GetParent();
                Assert.Equal("c1", redefinedParent?.Name);
            }
            using (var looked = dom.LookupCheckpoint("c2"))
            {
                Assert.Equal(xml, looked.GetXmlDesc());
            }

            first.Delete(LibvirtCheckpointDeleteFlags.Children | LibvirtCheckpointDeleteFlags.MetadataOnly);
            Assert.Empty(dom.ListAllCheckpoints());
        }
        finally
        {
            if (dom.IsActive)
            {
                dom.Destroy();
            }
            dom.Undefine();
        }
    }

    [Fact]
    public void Malformed_checkpoint_xml_is_reported_with_an_xml_error()
    {
        using var conn = LibvirtConnection.Open(TestDriverTests.DefaultUri);
        using var dom = conn.LookupDomainByName("test");
        var e = Assert.Throws<LibvirtException>(() => dom.CreateCheckpoint("<domaincheckpoint><name>x"));
        Assert.Equal(LibvirtErrorCode.XmlDetail, e.Code);
        Assert.Equal("CreateCheckpoint", e.Operation);
    }
}
