using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using BFMig.Native.Libvirt;

namespace BFMig.Native;

internal static partial class Interop
{
    internal static partial class Libvirt
    {
        /// <summary>struct _virError (virterror.h): the layout is part of libvirt's stable ABI.</summary>
        [StructLayout(LayoutKind.Sequential)]
        internal unsafe struct VirError
        {
            public int Code;
            public int Domain;
            public byte* Message;
            public int Level;
            public nint Conn;
            public nint Dom;
            public byte* Str1;
            public byte* Str2;
            public byte* Str3;
            public int Int1;
            public int Int2;
            public nint Net;
        }

        [LibraryImport(Library)]
        private static unsafe partial int virCopyLastError(VirError* to);

        [LibraryImport(Library)]
        private static unsafe partial void virResetError(VirError* err);

        [LibraryImport(Library)]
        private static partial void virResetLastError();

        [LibraryImport(Library)]
        private static unsafe partial void virSetErrorFunc(nint userData, delegate* unmanaged<nint, VirError*, void> handler);

        [UnmanagedCallersOnly]
        private static unsafe void IgnoreError(nint userData, VirError* error)
        {
            // Errors are read back with virCopyLastError by the wrapper that failed.
        }

        private static unsafe void SetQuietErrorHandler() => virSetErrorFunc(0, &IgnoreError);

        /// <summary>
        /// Builds the exception for the call that just failed on this thread. libvirt keeps the
        /// last error per thread, so this must run right after the failing call, before any await.
        /// </summary>
        internal static unsafe LibvirtException GetLastErrorException([CallerMemberName] string operation = "")
        {
            VirError error = default;
            int code = virCopyLastError(&error);
            try
            {
                if (code <= 0 || error.Code == 0)
                {
                    return new LibvirtException(operation, LibvirtErrorCode.InternalError, LibvirtErrorDomain.None,
                        "libvirt reported failure without setting an error");
                }
                string message = Marshal.PtrToStringUTF8((nint)error.Message) ?? "(no message)";
                return new LibvirtException(operation, (LibvirtErrorCode)error.Code, (LibvirtErrorDomain)error.Domain, message);
            }
            finally
            {
                virResetError(&error);
                virResetLastError();
            }
        }

        [System.Diagnostics.CodeAnalysis.DoesNotReturn]
        internal static void ThrowLastError([CallerMemberName] string operation = "") => throw GetLastErrorException(operation);

        /// <summary>Throws the thread's libvirt error when a call returned a negative status.</summary>
        internal static int Check(int result, [CallerMemberName] string operation = "")
        {
            if (result < 0)
            {
                ThrowLastError(operation);
            }
            return result;
        }
    }
}
