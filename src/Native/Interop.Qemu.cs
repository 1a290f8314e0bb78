using System.Runtime.InteropServices;
using BFMig.Native.Libvirt;

namespace BFMig.Native;

internal static partial class Interop
{
    internal static partial class Libvirt
    {
        [LibraryImport(QemuLibrary, StringMarshalling = StringMarshalling.Utf8)]
        private static unsafe partial int virDomainQemuMonitorCommand(DomainHandle domain, string cmd, byte** result, uint flags);

        /// <summary>QMP (or HMP with flag 1) passthrough; the result string is ours to free.</summary>
        internal static unsafe string DomainQemuMonitorCommand(DomainHandle domain, string command, uint flags)
        {
            byte* result = null;
            Check(virDomainQemuMonitorCommand(domain, command, &result, flags), "QemuMonitorCommand");
            return Libc.TakeUtf8(result) ?? "";
        }
    }
}
