global using Xunit;
global using Xunit.Abstractions;

[assembly: System.Runtime.Versioning.SupportedOSPlatform("linux")]
