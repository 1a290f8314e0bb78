using System.Runtime.InteropServices;
using BFMig.Native.Libvirt;
using virConnectPtr = nint;
using virDomainPtr = nint;

namespace BFMig.Native;

internal static partial class Interop
{
    internal static partial class Libvirt
    {
        /// <summary>virDomainEventID values BFMig listens to.</summary>
        internal const int DomainEventIdLifecycle = 0;
        internal const int DomainEventIdMigrationIteration = 20;
        internal const int DomainEventIdJobCompleted = 21;

        [LibraryImport(Library)]
        private static partial int virEventRegisterDefaultImpl();

        [LibraryImport(Library)]
        private static partial int virEventRunDefaultImpl();

        [LibraryImport(Library)]
        private static unsafe partial int virConnectDomainEventRegisterAny(ConnectHandle conn, virDomainPtr dom, int eventId,
            void* callback, nint opaque, delegate* unmanaged<nint, void> freecb);

        [LibraryImport(Library)]
        private static partial int virConnectDomainEventDeregisterAny(ConnectHandle conn, int callbackId);

        // Event callbacks get a borrowed virDomainPtr (valid during the callback only), so they read it raw.
        [LibraryImport(Library, EntryPoint = "virDomainGetName")]
        private static unsafe partial byte* virDomainGetNameBorrowed(virDomainPtr domain);

        [LibraryImport(Library, EntryPoint = "virDomainGetUUIDString")]
        private static unsafe partial int virDomainGetUUIDStringBorrowed(virDomainPtr domain, byte* buf);

        internal static void EventRegisterDefaultImpl()
        {
            EnsureInitialized();
            Check(virEventRegisterDefaultImpl(), "EventRegisterDefaultImpl");
        }

        /// <summary>Runs one iteration of libvirt's default event loop; false (error cleared) when it failed.</summary>
        internal static bool EventRunDefaultImplOnce()
        {
            if (virEventRunDefaultImpl() < 0)
            {
                _ = GetLastErrorException();
                return false;
            }
            return true;
        }

        internal static unsafe int ConnectDomainEventRegisterAny(ConnectHandle conn, int eventId, void* callback,
            nint opaque, delegate* unmanaged<nint, void> freecb) =>
            Check(virConnectDomainEventRegisterAny(conn, 0, eventId, callback, opaque, freecb), "SubscribeDomainEvents");

        internal static void ConnectDomainEventDeregisterAny(ConnectHandle conn, int callbackId) =>
            Check(virConnectDomainEventDeregisterAny(conn, callbackId), "UnsubscribeDomainEvents");

        /// <summary>Name and UUID of a domain that libvirt lends to an event callback.</summary>
        internal static unsafe (string Name, string Uuid) DescribeBorrowedDomain(virDomainPtr domain)
        {
            string name = Marshal.PtrToStringUTF8((nint)virDomainGetNameBorrowed(domain)) ?? "";
            byte* buffer = stackalloc byte[UuidStringBufferLength];
            string uuid = virDomainGetUUIDStringBorrowed(domain, buffer) == 0 ? Marshal.PtrToStringUTF8((nint)buffer)! : "";
            if (name.Length == 0 || uuid.Length == 0)
            {
                _ = GetLastErrorException();
            }
            return (name, uuid);
        }
    }
}
