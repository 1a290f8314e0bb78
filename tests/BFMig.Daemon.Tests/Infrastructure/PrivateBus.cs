using BFMig.Tests.Shared;

namespace BFMig.Daemon.Tests.Infrastructure;

/// <summary>The shared private dbus-daemon (reachable by uid 65534 for the non-root tests).</summary>
public sealed class PrivateBus() : PrivateDBusDaemon("bfmigd-bus-");
