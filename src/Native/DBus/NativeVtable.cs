using System.Runtime.InteropServices;
using System.Text;

namespace BFMig.Native.DBus;

/// <summary>
/// The sd_bus_vtable array for one <see cref="DBusObject"/>, in native memory that stays put for
/// as long as sd-bus holds the registration (sd-bus keeps pointers into it, including the strings).
/// </summary>
internal sealed unsafe class NativeVtable : IDisposable
{
    private readonly List<nint> _allocations = [];

    public NativeVtable(DBusObject obj, delegate* unmanaged<nint, nint, Interop.SdBus.SdBusError*, int> handler)
    {
        Count = obj.Methods.Count + obj.Signals.Count + 2;
        // Unused union bytes must be zero (sd-bus-vtable.h says so), hence AllocZeroed.
        Entries = (Interop.SdBus.SdBusVtable*)NativeMemory.AllocZeroed((nuint)Count, (nuint)sizeof(Interop.SdBus.SdBusVtable));
        _allocations.Add((nint)Entries);

        int i = 0;
        Entries[i].TypeAndFlags = Interop.SdBus.VtableStart;
        Entries[i].StartElementSize = (nuint)sizeof(Interop.SdBus.SdBusVtable);
        Entries[i].StartFeatures = Interop.SdBus.VtableParamNames;
        Entries[i].StartVtableFormatReference = Interop.SdBus.VtableFormatReference;
        i++;
        foreach (DBusMethodDefinition method in obj.Methods)
        {
            ulong flags = method.Access == DBusMethodAccess.Anyone ? Interop.SdBus.VtableUnprivileged : 0;
            Entries[i].TypeAndFlags = Interop.SdBus.VtableMethod | (flags << 8);
            Entries[i].MethodMember = Utf8(method.Name);
            Entries[i].MethodSignature = Utf8(method.InSignature);
            Entries[i].MethodResult = Utf8(method.OutSignature);
            Entries[i].MethodHandler = handler;
            Entries[i].MethodNames = Names(method.InNames, method.OutNames);
            i++;
        }
        foreach (DBusSignalDefinition signal in obj.Signals)
        {
            Entries[i].TypeAndFlags = Interop.SdBus.VtableSignal;
            Entries[i].SignalMember = Utf8(signal.Name);
            Entries[i].SignalSignature = Utf8(signal.Signature);
            Entries[i].SignalNames = Names(signal.Names, []);
            i++;
        }
        Entries[i].TypeAndFlags = Interop.SdBus.VtableEnd;
    }

    public Interop.SdBus.SdBusVtable* Entries { get; }

    public int Count { get; }

    private byte* Utf8(string value) => Block(Encoding.UTF8.GetBytes(value));

    /// <summary>SD_BUS_PARAM layout: each name NUL-terminated, in-names then out-names, one extra NUL at the end.</summary>
    private byte* Names(IReadOnlyList<string> first, IReadOnlyList<string> second)
    {
        var bytes = new List<byte>();
        foreach (string name in first.Concat(second))
        {
            bytes.AddRange(Encoding.UTF8.GetBytes(name));
            bytes.Add(0);
        }
        return Block([.. bytes]);
    }

    private byte* Block(byte[] content)
    {
        byte* p = (byte*)NativeMemory.AllocZeroed((nuint)content.Length + 1);
        _allocations.Add((nint)p);
        content.CopyTo(new Span<byte>(p, content.Length));
        return p;
    }

    public void Dispose()
    {
        foreach (nint p in _allocations)
        {
            NativeMemory.Free((void*)p);
        }
        _allocations.Clear();
    }
}
