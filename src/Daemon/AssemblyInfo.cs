// bfmigd drives libvirt/KVM hosts: Linux only (unix sockets with owners and modes, posix_spawn, the system bus).
[assembly: System.Runtime.Versioning.SupportedOSPlatform("linux")]
