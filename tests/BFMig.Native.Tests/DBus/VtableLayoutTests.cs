using System.Runtime.InteropServices;
using BFMig.Native.DBus;

namespace BFMig.Native.Tests.DBus;

/// <summary>Our sd_bus_vtable mirror against the C layout of systemd 252 (x86-64): 8-byte header, union of six pointers.</summary>
public sealed class VtableLayoutTests
{
    [Fact]
    public unsafe void Struct_size_and_field_offsets_match_the_C_layout()
    {
        Assert.Equal(56, sizeof(Interop.SdBus.SdBusVtable));
        Assert.Equal(0, (int)Marshal.OffsetOf<Interop.SdBus.SdBusVtable>(nameof(Interop.SdBus.SdBusVtable.TypeAndFlags)));
        Assert.Equal(8, (int)Marshal.OffsetOf<Interop.SdBus.SdBusVtable>(nameof(Interop.SdBus.SdBusVtable.StartElementSize)));
        Assert.Equal(16, (int)Marshal.OffsetOf<Interop.SdBus.SdBusVtable>(nameof(Interop.SdBus.SdBusVtable.StartFeatures)));
        Assert.Equal(24, (int)Marshal.OffsetOf<Interop.SdBus.SdBusVtable>(nameof(Interop.SdBus.SdBusVtable.StartVtableFormatReference)));
        Assert.Equal(8, (int)Marshal.OffsetOf<Interop.SdBus.SdBusVtable>(nameof(Interop.SdBus.SdBusVtable.MethodMember)));
        Assert.Equal(32, (int)Marshal.OffsetOf<Interop.SdBus.SdBusVtable>(nameof(Interop.SdBus.SdBusVtable.MethodHandler)));
        Assert.Equal(40, (int)Marshal.OffsetOf<Interop.SdBus.SdBusVtable>(nameof(Interop.SdBus.SdBusVtable.MethodOffset)));
        Assert.Equal(48, (int)Marshal.OffsetOf<Interop.SdBus.SdBusVtable>(nameof(Interop.SdBus.SdBusVtable.MethodNames)));
        Assert.Equal(24, (int)Marshal.OffsetOf<Interop.SdBus.SdBusVtable>(nameof(Interop.SdBus.SdBusVtable.SignalNames)));
        Assert.Equal(24, sizeof(Interop.SdBus.SdBusError));
    }

    [Fact]
    public unsafe void Built_vtable_has_start_methods_signals_end_and_the_library_format_reference()
    {
        var obj = new DBusObject("/a", "a.b")
            .AddMethod("M", "su", "s", _ => { }, ["x", "y"], ["z"])
            .AddSignal("S", "t", ["n"]);
        using var vtable = new NativeVtable(obj, null);
        Assert.Equal(4, vtable.Count);
        Interop.SdBus.SdBusVtable* e = vtable.Entries;
        Assert.Equal((ulong)'<', e[0].TypeAndFlags);
        Assert.Equal(56u, (uint)e[0].StartElementSize);
        Assert.Equal(1UL, e[0].StartFeatures);
        Assert.True(e[0].StartVtableFormatReference != null);
        Assert.Equal((ulong)'M', e[1].TypeAndFlags);
        Assert.Equal("M", Marshal.PtrToStringUTF8((nint)e[1].MethodMember));
        Assert.Equal("su", Marshal.PtrToStringUTF8((nint)e[1].MethodSignature));
        Assert.Equal("s", Marshal.PtrToStringUTF8((nint)e[1].MethodResult));
        Assert.Equal("x\0y\0z\0\0"u8.ToArray(), new ReadOnlySpan<byte>(e[1].MethodNames, 7).ToArray());
        Assert.Equal((ulong)'S', e[2].TypeAndFlags);
        Assert.Equal("n\0\0"u8.ToArray(), new ReadOnlySpan<byte>(e[2].SignalNames, 3).ToArray());
        Assert.Equal((ulong)'>', e[3].TypeAndFlags);
        Assert.Equal(0UL, e[3].StartFeatures);
    }
}
