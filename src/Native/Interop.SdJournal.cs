using System.Runtime.InteropServices;

namespace BFMig.Native;

internal static partial class Interop
{
    /// <summary>sd-journal and sd-daemon from libsystemd.so.0.</summary>
    internal static partial class SdJournal
    {
        internal const string Library = "libsystemd.so.0";

        /// <summary>struct iovec.</summary>
        [StructLayout(LayoutKind.Sequential)]
        internal unsafe struct IoVec
        {
            public void* Base;
            public nuint Length;
        }

        [LibraryImport(Library)]
        private static unsafe partial int sd_journal_sendv(IoVec* iov, int n);

        [LibraryImport(Library, StringMarshalling = StringMarshalling.Utf8)]
        private static partial int sd_notify(int unsetEnvironment, string state);

        /// <summary>Sends one journal entry made of "FIELD=value" byte strings; 0 or a negative errno.</summary>
        internal static unsafe int SendV(IReadOnlyList<byte[]> fields)
        {
            var handles = new GCHandle[fields.Count];
            IoVec* iov = stackalloc IoVec[fields.Count];
            try
            {
                for (int i = 0; i < fields.Count; i++)
                {
                    handles[i] = GCHandle.Alloc(fields[i], GCHandleType.Pinned);
                    iov[i].Base = (void*)handles[i].AddrOfPinnedObject();
                    iov[i].Length = (nuint)fields[i].Length;
                }
                return sd_journal_sendv(iov, fields.Count);
            }
            finally
            {
                foreach (GCHandle handle in handles)
                {
                    if (handle.IsAllocated)
                    {
                        handle.Free();
                    }
                }
            }
        }

        /// <summary>sd_notify: &gt;0 sent, 0 when NOTIFY_SOCKET is unset, negative errno on failure.</summary>
        internal static int Notify(string state) => sd_notify(0, state);
    }
}
