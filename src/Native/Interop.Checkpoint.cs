using System.Runtime.InteropServices;
using BFMig.Native.Libvirt;
using virDomainCheckpointPtr = nint;

namespace BFMig.Native;

internal static partial class Interop
{
    internal static partial class Libvirt
    {
        [LibraryImport(Library, StringMarshalling = StringMarshalling.Utf8)]
        private static partial virDomainCheckpointPtr virDomainCheckpointCreateXML(DomainHandle domain, string xml, uint flags);

        [LibraryImport(Library, StringMarshalling = StringMarshalling.Utf8)]
        private static partial virDomainCheckpointPtr virDomainCheckpointLookupByName(DomainHandle domain, string name, uint flags);

        [LibraryImport(Library)]
        private static unsafe partial int virDomainListAllCheckpoints(DomainHandle domain, virDomainCheckpointPtr** checkpoints, uint flags);

        [LibraryImport(Library)]
        private static partial virDomainCheckpointPtr virDomainCheckpointGetParent(CheckpointHandle checkpoint, uint flags);

        [LibraryImport(Library)]
        private static unsafe partial byte* virDomainCheckpointGetXMLDesc(CheckpointHandle checkpoint, uint flags);

        /// <summary>Borrowed, like virDomainGetName.</summary>
        [LibraryImport(Library)]
        private static unsafe partial byte* virDomainCheckpointGetName(CheckpointHandle checkpoint);

        [LibraryImport(Library)]
        private static partial int virDomainCheckpointDelete(CheckpointHandle checkpoint, uint flags);

        [LibraryImport(Library)]
        private static partial int virDomainCheckpointFree(virDomainCheckpointPtr checkpoint);

        internal static int CheckpointFree(virDomainCheckpointPtr checkpoint) => virDomainCheckpointFree(checkpoint);

        private static CheckpointHandle AdoptCheckpoint(virDomainCheckpointPtr pointer, SafeHandle owner)
        {
            var handle = new CheckpointHandle();
            Marshal.InitHandle(handle, pointer);
            handle.KeepAlive(owner);
            return handle;
        }

        private static CheckpointHandle AdoptCheckpointOrThrow(virDomainCheckpointPtr pointer, SafeHandle owner, string operation)
        {
            if (pointer == 0)
            {
                ThrowLastError(operation);
            }
            return AdoptCheckpoint(pointer, owner);
        }

        internal static CheckpointHandle CheckpointCreateXml(DomainHandle domain, string xml, uint flags) =>
            AdoptCheckpointOrThrow(virDomainCheckpointCreateXML(domain, xml, flags), domain, "CreateCheckpoint");

        internal static CheckpointHandle CheckpointLookupByName(DomainHandle domain, string name) =>
            AdoptCheckpointOrThrow(virDomainCheckpointLookupByName(domain, name, 0), domain, "LookupCheckpoint");

        internal static unsafe CheckpointHandle[] DomainListAllCheckpoints(DomainHandle domain, uint flags)
        {
            virDomainCheckpointPtr* checkpoints = null;
            int count = Check(virDomainListAllCheckpoints(domain, &checkpoints, flags), "ListCheckpoints");
            try
            {
                var result = new CheckpointHandle[count];
                for (int i = 0; i < count; i++)
                {
                    result[i] = AdoptCheckpoint(checkpoints[i], domain);
                }
                return result;
            }
            finally
            {
                Libc.Free(checkpoints);
            }
        }

        /// <summary>The parent checkpoint, or null for a root checkpoint (libvirt signals that as VIR_ERR_NO_DOMAIN_CHECKPOINT).</summary>
        internal static CheckpointHandle? CheckpointGetParent(CheckpointHandle checkpoint, SafeHandle domain)
        {
            virDomainCheckpointPtr parent = virDomainCheckpointGetParent(checkpoint, 0);
            if (parent != 0)
            {
                return AdoptCheckpoint(parent, domain);
            }
            LibvirtException error = GetLastErrorException("GetParent");
            return error.Code == LibvirtErrorCode.NoDomainCheckpoint ? null : throw error;
        }

        internal static unsafe string CheckpointGetXmlDesc(CheckpointHandle checkpoint, uint flags) =>
            Libc.TakeUtf8(virDomainCheckpointGetXMLDesc(checkpoint, flags)) ?? throw GetLastErrorException("GetXmlDesc");

        internal static unsafe string CheckpointGetName(CheckpointHandle checkpoint)
        {
            byte* name = virDomainCheckpointGetName(checkpoint);
            if (name == null)
            {
                ThrowLastError("GetName");
            }
            return Marshal.PtrToStringUTF8((nint)name)!;
        }

        internal static void CheckpointDelete(CheckpointHandle checkpoint, uint flags) =>
            Check(virDomainCheckpointDelete(checkpoint, flags), "DeleteCheckpoint");
    }
}
