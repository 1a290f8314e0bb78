using BFMig.Daemon.Guests;

namespace BFMig.Daemon.Tests;

public class DomainMemoryTests
{
    [Theory]
    [InlineData("<domain><memory unit='KiB'>524288</memory><currentMemory unit='KiB'>262144</currentMemory></domain>", 512L << 20)]
    [InlineData("<domain><memory>1024</memory></domain>", 1L << 20)]
    [InlineData("<domain><maxMemory slots='16' unit='GiB'>8</maxMemory><memory unit='GiB'>2</memory></domain>", 8L << 30)]
    [InlineData("<domain><memory unit='parsecs'>3</memory></domain>", 0L)]
    [InlineData("<domain><memory unit='TiB'>99999999999</memory></domain>", 0L)]
    [InlineData("<domain><memory", 0L)]
    public void The_largest_memory_the_domain_can_have_bounds_what_a_peer_may_declare(string xml, long expected) =>
        Assert.Equal(expected, DomainMemory.MaxBytes(xml));
}
