using BFMig.Tests.Shared;

namespace BFMig.Cli.Tests;

/// <summary>The shared private dbus-daemon, one per test run of this assembly.</summary>
public sealed class PrivateBus() : PrivateDBusDaemon("bfmig-cli-dbus-");

[CollectionDefinition(Name)]
public sealed class BusCollection : ICollectionFixture<PrivateBus>
{
    public const string Name = "private bus";
}
