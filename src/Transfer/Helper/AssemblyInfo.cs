// bfmig-transfer runs beside QEMU on Linux KVM hosts: Linux only (its signals, the store's sync_file_range, SO_PEERCRED).
[assembly: System.Runtime.Versioning.SupportedOSPlatform("linux")]
