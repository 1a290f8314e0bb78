// bfmig-hook runs only on Linux hosts under libvirt (file modes, /run markers).
[assembly: System.Runtime.Versioning.SupportedOSPlatform("linux")]
