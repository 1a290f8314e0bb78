using System.Runtime.InteropServices;

namespace BFMig.Native;

internal static partial class Interop
{
    /// <summary>libvirt (libvirt.so.0) and its QEMU extension (libvirt-qemu.so.0).</summary>
    internal static partial class Libvirt
    {
        internal const string Library = "libvirt.so.0";
        internal const string QemuLibrary = "libvirt-qemu.so.0";

        private static readonly Lock s_initLock = new();
        private static volatile bool s_initialized;

        [LibraryImport(Library)]
        private static partial int virInitialize();

        /// <summary>
        /// virInitialize must run before several threads use libvirt, and the default error
        /// handler must be replaced before the first failure or libvirt prints every error to
        /// stderr (the hook's stderr ends up in libvirtd's log, the daemon's in the journal).
        /// </summary>
        internal static void EnsureInitialized()
        {
            if (s_initialized)
            {
                return;
            }
            lock (s_initLock)
            {
                if (s_initialized)
                {
                    return;
                }
                if (virInitialize() < 0)
                {
                    throw GetLastErrorException();
                }
                SetQuietErrorHandler();
                s_initialized = true;
            }
        }
    }
}
