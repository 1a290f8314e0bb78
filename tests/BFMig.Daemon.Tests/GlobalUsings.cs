global using Xunit;
global using BFMig.Contracts;

// The daemons under test share one libvirt test driver (test:///default is per process) and its
// guest "test": tests that start, stop or migrate it must not overlap.
[assembly: CollectionBehavior(DisableTestParallelization = true)]

// Like the daemon itself, its tests are Linux only.
[assembly: System.Runtime.Versioning.SupportedOSPlatform("linux")]
