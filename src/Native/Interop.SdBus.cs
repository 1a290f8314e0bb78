using System.Runtime.InteropServices;
using BFMig.Native.DBus;
using sd_bus = nint;
using sd_bus_creds = nint;
using sd_bus_message = nint;
using sd_bus_slot = nint;

namespace BFMig.Native;

internal static partial class Interop
{
    /// <summary>sd-bus from libsystemd.so.0 (systemd 252 ABI). sd-bus objects are not thread-safe: callers serialize.</summary>
    internal static partial class SdBus
    {
        internal const string Library = "libsystemd.so.0";

        internal const ulong CredsEuid = 1UL << 4;

        /// <summary>sd_bus_error: name, message, _need_free.</summary>
        [StructLayout(LayoutKind.Sequential)]
        internal unsafe struct SdBusError
        {
            public byte* Name;
            public byte* Message;
            public int NeedFree;
        }

        /// <summary>
        /// struct sd_bus_vtable (sd-bus-vtable.h since systemd 242): a 64-bit word holding
        /// <c>uint8_t type:8</c> and <c>uint64_t flags:56</c> (type in the low byte on x86-64/aarch64
        /// little-endian GCC bit-field layout), then a union of at most six pointer-sized fields.
        /// </summary>
        [StructLayout(LayoutKind.Explicit, Size = 56)]
        internal unsafe struct SdBusVtable
        {
            [FieldOffset(0)] public ulong TypeAndFlags;

            [FieldOffset(8)] public nuint StartElementSize;
            [FieldOffset(16)] public ulong StartFeatures;
            [FieldOffset(24)] public uint* StartVtableFormatReference;

            [FieldOffset(8)] public byte* MethodMember;
            [FieldOffset(16)] public byte* MethodSignature;
            [FieldOffset(24)] public byte* MethodResult;
            [FieldOffset(32)] public void* MethodHandler;
            [FieldOffset(40)] public nuint MethodOffset;
            [FieldOffset(48)] public byte* MethodNames;

            [FieldOffset(8)] public byte* SignalMember;
            [FieldOffset(16)] public byte* SignalSignature;
            [FieldOffset(24)] public byte* SignalNames;
        }

        internal const byte VtableStart = (byte)'<';
        internal const byte VtableEnd = (byte)'>';
        internal const byte VtableMethod = (byte)'M';
        internal const byte VtableSignal = (byte)'S';
        internal const ulong VtableParamNames = 1;
        internal const ulong VtableUnprivileged = 1 << 2;

        [LibraryImport(Library)] internal static unsafe partial int sd_bus_open_system(sd_bus* ret);
        [LibraryImport(Library)] internal static unsafe partial int sd_bus_open_user(sd_bus* ret);
        [LibraryImport(Library)] internal static unsafe partial int sd_bus_new(sd_bus* ret);
        [LibraryImport(Library, StringMarshalling = StringMarshalling.Utf8)] internal static partial int sd_bus_set_address(sd_bus bus, string address);
        [LibraryImport(Library)] internal static partial int sd_bus_set_bus_client(sd_bus bus, int b);
        [LibraryImport(Library)] internal static partial int sd_bus_start(sd_bus bus);
        [LibraryImport(Library)] internal static partial sd_bus sd_bus_flush_close_unref(sd_bus bus);
        [LibraryImport(Library, StringMarshalling = StringMarshalling.Utf8)] internal static partial int sd_bus_request_name(sd_bus bus, string name, ulong flags);
        [LibraryImport(Library, StringMarshalling = StringMarshalling.Utf8)] internal static partial int sd_bus_release_name(sd_bus bus, string name);
        [LibraryImport(Library)] internal static unsafe partial int sd_bus_get_unique_name(sd_bus bus, byte** unique);
        [LibraryImport(Library)] internal static partial int sd_bus_get_fd(sd_bus bus);
        [LibraryImport(Library)] internal static partial int sd_bus_get_events(sd_bus bus);
        [LibraryImport(Library)] internal static unsafe partial int sd_bus_get_timeout(sd_bus bus, ulong* timeoutUsec);
        [LibraryImport(Library)] internal static unsafe partial int sd_bus_process(sd_bus bus, sd_bus_message* r);
        [LibraryImport(Library)] internal static partial int sd_bus_is_open(sd_bus bus);

        [LibraryImport(Library, StringMarshalling = StringMarshalling.Utf8)]
        internal static unsafe partial int sd_bus_add_object_vtable(sd_bus bus, sd_bus_slot* slot, string path, string iface, SdBusVtable* vtable, nint userdata);

        [LibraryImport(Library, StringMarshalling = StringMarshalling.Utf8)]
        internal static unsafe partial int sd_bus_match_signal(sd_bus bus, sd_bus_slot* slot, string? sender, string? path, string? iface, string? member,
            delegate* unmanaged<sd_bus_message, nint, SdBusError*, int> callback, nint userdata);

        [LibraryImport(Library)] internal static partial sd_bus_slot sd_bus_slot_unref(sd_bus_slot slot);

        [LibraryImport(Library, StringMarshalling = StringMarshalling.Utf8)]
        internal static unsafe partial int sd_bus_message_new_method_call(sd_bus bus, sd_bus_message* m, string? destination, string path, string? iface, string member);

        [LibraryImport(Library, StringMarshalling = StringMarshalling.Utf8)]
        internal static unsafe partial int sd_bus_message_new_signal(sd_bus bus, sd_bus_message* m, string path, string iface, string member);

        [LibraryImport(Library)] internal static unsafe partial int sd_bus_message_new_method_return(sd_bus_message call, sd_bus_message* m);
        [LibraryImport(Library)] internal static unsafe partial int sd_bus_reply_method_error(sd_bus_message call, SdBusError* e);
        [LibraryImport(Library)] internal static unsafe partial int sd_bus_call(sd_bus bus, sd_bus_message m, ulong usec, SdBusError* retError, sd_bus_message* reply);

        [LibraryImport(Library)]
        internal static unsafe partial int sd_bus_call_async(sd_bus bus, sd_bus_slot* slot, sd_bus_message m,
            delegate* unmanaged<sd_bus_message, nint, SdBusError*, int> callback, nint userdata, ulong usec);

        [LibraryImport(Library)] internal static unsafe partial int sd_bus_send(sd_bus bus, sd_bus_message m, ulong* cookie);
        [LibraryImport(Library)] internal static partial sd_bus_message sd_bus_message_ref(sd_bus_message m);
        [LibraryImport(Library)] internal static partial sd_bus_message sd_bus_message_unref(sd_bus_message m);

        [LibraryImport(Library)] internal static unsafe partial int sd_bus_message_append_basic(sd_bus_message m, byte type, void* p);
        [LibraryImport(Library, StringMarshalling = StringMarshalling.Utf8)] internal static partial int sd_bus_message_open_container(sd_bus_message m, byte type, string contents);
        [LibraryImport(Library)] internal static partial int sd_bus_message_close_container(sd_bus_message m);
        [LibraryImport(Library)] internal static unsafe partial int sd_bus_message_read_basic(sd_bus_message m, byte type, void* p);
        [LibraryImport(Library, StringMarshalling = StringMarshalling.Utf8)] internal static partial int sd_bus_message_enter_container(sd_bus_message m, byte type, string? contents);
        [LibraryImport(Library)] internal static partial int sd_bus_message_exit_container(sd_bus_message m);
        [LibraryImport(Library)] internal static unsafe partial int sd_bus_message_peek_type(sd_bus_message m, byte* type, byte** contents);
        [LibraryImport(Library)] internal static partial int sd_bus_message_at_end(sd_bus_message m, int complete);
        [LibraryImport(Library, StringMarshalling = StringMarshalling.Utf8)] internal static partial int sd_bus_message_skip(sd_bus_message m, string? types);

        [LibraryImport(Library)] internal static unsafe partial byte* sd_bus_message_get_sender(sd_bus_message m);
        [LibraryImport(Library)] internal static unsafe partial byte* sd_bus_message_get_member(sd_bus_message m);
        [LibraryImport(Library)] internal static unsafe partial byte* sd_bus_message_get_path(sd_bus_message m);
        [LibraryImport(Library)] internal static unsafe partial byte* sd_bus_message_get_interface(sd_bus_message m);
        [LibraryImport(Library)] internal static unsafe partial byte* sd_bus_message_get_signature(sd_bus_message m, int complete);
        [LibraryImport(Library)] internal static unsafe partial SdBusError* sd_bus_message_get_error(sd_bus_message m);
        [LibraryImport(Library)] internal static partial int sd_bus_message_is_method_error(sd_bus_message m, nint name);

        [LibraryImport(Library)] internal static unsafe partial void sd_bus_error_free(SdBusError* e);
        [LibraryImport(Library, StringMarshalling = StringMarshalling.Utf8)] internal static unsafe partial int sd_bus_error_set(SdBusError* e, string name, string? message);

        [LibraryImport(Library)] internal static unsafe partial int sd_bus_query_sender_creds(sd_bus_message m, ulong mask, sd_bus_creds* creds);
        [LibraryImport(Library)] internal static unsafe partial int sd_bus_creds_get_euid(sd_bus_creds c, uint* euid);
        [LibraryImport(Library)] internal static partial sd_bus_creds sd_bus_creds_unref(sd_bus_creds c);

        private static unsafe uint* s_vtableFormat;

        /// <summary>
        /// &amp;sd_bus_object_vtable_format: libsystemd checks that the START entry points at its own
        /// exported symbol before it trusts the 242+ layout (parameter names), so we hand it that address.
        /// </summary>
        internal static unsafe uint* VtableFormatReference
        {
            get
            {
                if (s_vtableFormat == null)
                {
                    nint lib = NativeLibrary.Load(Library, typeof(SdBus).Assembly, null);
                    s_vtableFormat = (uint*)NativeLibrary.GetExport(lib, "sd_bus_object_vtable_format");
                }
                return s_vtableFormat;
            }
        }

        /// <summary>Throws <see cref="DBusException"/> for a negative errno result.</summary>
        internal static int Check(int result, string operation)
        {
            if (result < 0)
            {
                throw DBusException.FromErrno(-result, operation);
            }
            return result;
        }

        internal static unsafe string? PtrToString(byte* p) => p == null ? null : Marshal.PtrToStringUTF8((nint)p);
    }
}
