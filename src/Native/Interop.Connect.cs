using System.Runtime.InteropServices;
using BFMig.Native.Libvirt;
using virConnectPtr = nint;
using virDomainPtr = nint;

namespace BFMig.Native;

internal static partial class Interop
{
    internal static partial class Libvirt
    {
        [LibraryImport(Library, StringMarshalling = StringMarshalling.Utf8)]
        private static partial ConnectHandle virConnectOpen(string? name);

        [LibraryImport(Library, StringMarshalling = StringMarshalling.Utf8)]
        private static partial ConnectHandle virConnectOpenReadOnly(string? name);

        [LibraryImport(Library)]
        private static partial int virConnectClose(virConnectPtr conn);

        [LibraryImport(Library)]
        private static unsafe partial byte* virConnectGetURI(ConnectHandle conn);

        [LibraryImport(Library)]
        private static unsafe partial byte* virConnectGetHostname(ConnectHandle conn);

        [LibraryImport(Library)]
        private static unsafe partial int virConnectGetLibVersion(ConnectHandle conn, nuint* libVer);

        [LibraryImport(Library)]
        private static partial int virConnectIsAlive(ConnectHandle conn);

        [LibraryImport(Library)]
        private static unsafe partial int virConnectListAllDomains(ConnectHandle conn, virDomainPtr** domains, uint flags);

        [LibraryImport(Library)]
        private static partial int virConnectSetKeepAlive(ConnectHandle conn, int interval, uint count);

        [LibraryImport(Library)]
        private static unsafe partial int virConnectRegisterCloseCallback(ConnectHandle conn,
            delegate* unmanaged<virConnectPtr, int, nint, void> cb, nint opaque, delegate* unmanaged<nint, void> freecb);

        [LibraryImport(Library)]
        private static unsafe partial int virConnectUnregisterCloseCallback(ConnectHandle conn,
            delegate* unmanaged<virConnectPtr, int, nint, void> cb);

        internal static ConnectHandle ConnectOpen(string uri, bool readOnly)
        {
            EnsureInitialized();
            ConnectHandle handle = readOnly ? virConnectOpenReadOnly(uri) : virConnectOpen(uri);
            if (handle.IsInvalid)
            {
                handle.Dispose();
                ThrowLastError();
            }
            return handle;
        }

        internal static int ConnectClose(virConnectPtr conn) => virConnectClose(conn);

        internal static unsafe string ConnectGetUri(ConnectHandle conn) =>
            Libc.TakeUtf8(virConnectGetURI(conn)) ?? throw GetLastErrorException();

        internal static unsafe string ConnectGetHostname(ConnectHandle conn) =>
            Libc.TakeUtf8(virConnectGetHostname(conn)) ?? throw GetLastErrorException();

        internal static unsafe ulong ConnectGetLibVersion(ConnectHandle conn)
        {
            nuint version;
            Check(virConnectGetLibVersion(conn, &version));
            return version;
        }

        internal static bool ConnectIsAlive(ConnectHandle conn) => Check(virConnectIsAlive(conn)) == 1;

        internal static unsafe DomainHandle[] ConnectListAllDomains(ConnectHandle conn, uint flags)
        {
            virDomainPtr* domains = null;
            int count = Check(virConnectListAllDomains(conn, &domains, flags));
            try
            {
                var result = new DomainHandle[count];
                for (int i = 0; i < count; i++)
                {
                    result[i] = AdoptDomain(domains[i], conn);
                }
                return result;
            }
            finally
            {
                // The array is ours; each element now belongs to a DomainHandle.
                Libc.Free(domains);
            }
        }

        /// <summary>Returns false when the driver has no keepalive (local drivers such as test:///).</summary>
        internal static bool ConnectSetKeepAlive(ConnectHandle conn, int intervalSeconds, uint count)
        {
            int rc = virConnectSetKeepAlive(conn, intervalSeconds, count);
            if (rc < 0)
            {
                LibvirtException error = GetLastErrorException();
                return error.Code == LibvirtErrorCode.NoSupport ? false : throw error;
            }
            // 1: the remote side does not answer keepalive probes.
            return rc == 0;
        }

        internal static unsafe void ConnectRegisterCloseCallback(ConnectHandle conn,
            delegate* unmanaged<virConnectPtr, int, nint, void> cb, nint opaque, delegate* unmanaged<nint, void> freecb) =>
            Check(virConnectRegisterCloseCallback(conn, cb, opaque, freecb));

        internal static unsafe void ConnectUnregisterCloseCallback(ConnectHandle conn,
            delegate* unmanaged<virConnectPtr, int, nint, void> cb) =>
            Check(virConnectUnregisterCloseCallback(conn, cb));
    }
}
