// The daemon and the hook are Linux-only assemblies; so is the harness that drives them.
[assembly: System.Runtime.Versioning.SupportedOSPlatform("linux")]
