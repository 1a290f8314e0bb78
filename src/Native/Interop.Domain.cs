using System.Runtime.InteropServices;
using BFMig.Native.Libvirt;
using virDomainPtr = nint;

namespace BFMig.Native;

internal static partial class Interop
{
    internal static partial class Libvirt
    {
        /// <summary>VIR_UUID_STRING_BUFLEN (36 characters + NUL).</summary>
        private const int UuidStringBufferLength = 37;

        [LibraryImport(Library, StringMarshalling = StringMarshalling.Utf8)]
        private static partial virDomainPtr virDomainLookupByName(ConnectHandle conn, string name);

        [LibraryImport(Library, StringMarshalling = StringMarshalling.Utf8)]
        private static partial virDomainPtr virDomainLookupByUUIDString(ConnectHandle conn, string uuid);

        [LibraryImport(Library, StringMarshalling = StringMarshalling.Utf8)]
        private static partial virDomainPtr virDomainDefineXMLFlags(ConnectHandle conn, string xml, uint flags);

        [LibraryImport(Library, StringMarshalling = StringMarshalling.Utf8)]
        private static partial virDomainPtr virDomainCreateXML(ConnectHandle conn, string xml, uint flags);

        [LibraryImport(Library)]
        private static partial int virDomainFree(virDomainPtr domain);

        [LibraryImport(Library)]
        private static partial int virDomainUndefineFlags(DomainHandle domain, uint flags);

        [LibraryImport(Library)]
        private static partial int virDomainCreateWithFlags(DomainHandle domain, uint flags);

        [LibraryImport(Library)]
        private static partial int virDomainDestroyFlags(DomainHandle domain, uint flags);

        [LibraryImport(Library)]
        private static partial int virDomainShutdown(DomainHandle domain);

        [LibraryImport(Library)]
        private static partial int virDomainSuspend(DomainHandle domain);

        [LibraryImport(Library)]
        private static partial int virDomainResume(DomainHandle domain);

        [LibraryImport(Library)]
        private static unsafe partial byte* virDomainGetXMLDesc(DomainHandle domain, uint flags);

        [LibraryImport(Library)]
        private static unsafe partial int virDomainGetState(DomainHandle domain, int* state, int* reason, uint flags);

        [LibraryImport(Library)]
        private static unsafe partial int virDomainGetUUIDString(DomainHandle domain, byte* buf);

        /// <summary>Borrowed: the string lives as long as the domain object; never free it.</summary>
        [LibraryImport(Library)]
        private static unsafe partial byte* virDomainGetName(DomainHandle domain);

        [LibraryImport(Library)]
        private static partial uint virDomainGetID(DomainHandle domain);

        [LibraryImport(Library)]
        private static partial int virDomainIsActive(DomainHandle domain);

        [LibraryImport(Library)]
        private static partial int virDomainIsPersistent(DomainHandle domain);

        [LibraryImport(Library)]
        private static unsafe partial int virDomainGetJobStats(DomainHandle domain, int* type, VirTypedParameter** parameters, int* nparams, uint flags);

        [LibraryImport(Library)]
        private static partial int virDomainAbortJob(DomainHandle domain);

        [LibraryImport(Library, StringMarshalling = StringMarshalling.Utf8)]
        private static unsafe partial int virDomainMigrateToURI3(DomainHandle domain, string? dconnuri, VirTypedParameter* parameters, uint nparams, uint flags);

        /// <summary>Returns the domain on <paramref name="dconn"/> (owned), or null on failure. C <c>unsigned long</c> is 64 bits here (LP64).</summary>
        [LibraryImport(Library, StringMarshalling = StringMarshalling.Utf8)]
        private static partial virDomainPtr virDomainMigrate(DomainHandle domain, ConnectHandle dconn, nuint flags, string? dname, string? uri, nuint bandwidth);

        [LibraryImport(Library)]
        private static partial int virDomainMigrateSetMaxDowntime(DomainHandle domain, ulong downtimeMs, uint flags);

        /// <summary>Wraps a virDomainPtr that the caller owns (one reference) into a handle that keeps <paramref name="conn"/> alive.</summary>
        internal static DomainHandle AdoptDomain(virDomainPtr pointer, ConnectHandle conn)
        {
            var handle = new DomainHandle();
            Marshal.InitHandle(handle, pointer);
            handle.KeepAlive(conn);
            return handle;
        }

        private static DomainHandle AdoptDomainOrThrow(virDomainPtr pointer, ConnectHandle conn, string operation)
        {
            if (pointer == 0)
            {
                ThrowLastError(operation);
            }
            return AdoptDomain(pointer, conn);
        }

        internal static int DomainFree(virDomainPtr domain) => virDomainFree(domain);

        internal static DomainHandle DomainLookupByName(ConnectHandle conn, string name) =>
            AdoptDomainOrThrow(virDomainLookupByName(conn, name), conn, "LookupDomainByName");

        internal static DomainHandle DomainLookupByUuidString(ConnectHandle conn, string uuid) =>
            AdoptDomainOrThrow(virDomainLookupByUUIDString(conn, uuid), conn, "LookupDomainByUuid");

        internal static DomainHandle DomainDefineXml(ConnectHandle conn, string xml, uint flags) =>
            AdoptDomainOrThrow(virDomainDefineXMLFlags(conn, xml, flags), conn, "DefineDomain");

        internal static DomainHandle DomainCreateXml(ConnectHandle conn, string xml, uint flags) =>
            AdoptDomainOrThrow(virDomainCreateXML(conn, xml, flags), conn, "CreateTransientDomain");

        internal static void DomainUndefine(DomainHandle domain, uint flags) => Check(virDomainUndefineFlags(domain, flags), "Undefine");

        internal static void DomainCreate(DomainHandle domain, uint flags) => Check(virDomainCreateWithFlags(domain, flags), "Start");

        internal static void DomainDestroy(DomainHandle domain, uint flags) => Check(virDomainDestroyFlags(domain, flags), "Destroy");

        internal static void DomainShutdown(DomainHandle domain) => Check(virDomainShutdown(domain), "Shutdown");

        internal static void DomainSuspend(DomainHandle domain) => Check(virDomainSuspend(domain), "Suspend");

        internal static void DomainResume(DomainHandle domain) => Check(virDomainResume(domain), "Resume");

        internal static unsafe string DomainGetXmlDesc(DomainHandle domain, uint flags) =>
            Libc.TakeUtf8(virDomainGetXMLDesc(domain, flags)) ?? throw GetLastErrorException("GetXmlDesc");

        internal static unsafe (int State, int Reason) DomainGetState(DomainHandle domain)
        {
            int state, reason;
            Check(virDomainGetState(domain, &state, &reason, 0), "GetState");
            return (state, reason);
        }

        internal static unsafe string DomainGetUuidString(DomainHandle domain)
        {
            byte* buffer = stackalloc byte[UuidStringBufferLength];
            Check(virDomainGetUUIDString(domain, buffer), "GetUuid");
            return Marshal.PtrToStringUTF8((nint)buffer)!;
        }

        internal static unsafe string DomainGetName(DomainHandle domain)
        {
            byte* name = virDomainGetName(domain);
            if (name == null)
            {
                ThrowLastError("GetName");
            }
            return Marshal.PtrToStringUTF8((nint)name)!;
        }

        /// <summary>The hypervisor id, or -1 for an inactive domain.</summary>
        internal static int DomainGetId(DomainHandle domain)
        {
            uint id = virDomainGetID(domain);
            return id == uint.MaxValue ? -1 : (int)id;
        }

        internal static bool DomainIsActive(DomainHandle domain) => Check(virDomainIsActive(domain), "IsActive") == 1;

        internal static bool DomainIsPersistent(DomainHandle domain) => Check(virDomainIsPersistent(domain), "IsPersistent") == 1;

        internal static unsafe (int Type, LibvirtTypedParameter[] Fields) DomainGetJobStats(DomainHandle domain, uint flags)
        {
            int type;
            VirTypedParameter* parameters = null;
            int count = 0;
            Check(virDomainGetJobStats(domain, &type, &parameters, &count, flags), "GetJobStats");
            try
            {
                return (type, ReadTypedParams(parameters, count));
            }
            finally
            {
                virTypedParamsFree(parameters, count);
            }
        }

        internal static void DomainAbortJob(DomainHandle domain) => Check(virDomainAbortJob(domain), "AbortJob");

        internal static void DomainMigrateSetMaxDowntime(DomainHandle domain, ulong downtimeMs) =>
            Check(virDomainMigrateSetMaxDowntime(domain, downtimeMs, 0), "SetMaxDowntime");

        /// <summary>virDomainMigrate: the managed migration a client drives over two connections; the migrated domain on <paramref name="destination"/>.</summary>
        internal static DomainHandle DomainMigrate(DomainHandle domain, ConnectHandle destination, uint flags, string? destinationName, string? uri, ulong bandwidthMiBps) =>
            AdoptDomainOrThrow(virDomainMigrate(domain, destination, flags, destinationName, uri, (nuint)bandwidthMiBps), destination, "Migrate");

        internal static unsafe void DomainMigrateToUri3(DomainHandle domain, string? destinationUri, TypedParameterList parameters, uint flags) =>
            Check(virDomainMigrateToURI3(domain, destinationUri, parameters.Pointer, (uint)parameters.Count, flags), "MigrateToUri3");
    }
}
