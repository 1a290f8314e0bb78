using System.Runtime.InteropServices;

namespace BFMig.Native;

internal static partial class Interop
{
    /// <summary>The C library: memory that other libraries hand over to us, and a few system calls.</summary>
    internal static partial class Libc
    {
        internal const string Library = "libc";

        /// <summary>Frees memory that a C library allocated with malloc and documented as ours to free.</summary>
        [LibraryImport(Library, EntryPoint = "free")]
        internal static unsafe partial void Free(void* ptr);

        /// <summary>Changes the C environment (getenv in native code never sees Environment.SetEnvironmentVariable).</summary>
        [LibraryImport(Library, EntryPoint = "setenv", StringMarshalling = StringMarshalling.Utf8, SetLastError = true)]
        internal static partial int SetEnv(string name, string value, int overwrite);

        [LibraryImport(Library, EntryPoint = "unsetenv", StringMarshalling = StringMarshalling.Utf8, SetLastError = true)]
        internal static partial int UnsetEnv(string name);

        /// <summary>Copies a NUL-terminated UTF-8 string that the caller owns, then frees it with free().</summary>
        internal static unsafe string? TakeUtf8(byte* owned)
        {
            if (owned == null)
            {
                return null;
            }
            try
            {
                return Marshal.PtrToStringUTF8((nint)owned);
            }
            finally
            {
                Free(owned);
            }
        }
    }
}
