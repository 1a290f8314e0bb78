using System.Runtime.InteropServices;
using System.Text;

namespace BFMig.Native.Processes;

/// <summary>A NULL-terminated array of NUL-terminated UTF-8 strings, as argv and envp of posix_spawn and execve take them.</summary>
internal sealed unsafe class NativeStringArray : IDisposable
{
    private readonly IntPtr[] _strings;

    public NativeStringArray(IReadOnlyList<string> values)
    {
        _strings = new IntPtr[values.Count];
        Pointer = (byte**)NativeMemory.Alloc((nuint)(values.Count + 1), (nuint)sizeof(byte*));
        for (var i = 0; i < values.Count; i++)
        {
            var bytes = Encoding.UTF8.GetBytes(values[i] + "\0");
            _strings[i] = Marshal.AllocHGlobal(bytes.Length);
            Marshal.Copy(bytes, 0, _strings[i], bytes.Length);
            Pointer[i] = (byte*)_strings[i];
        }
        Pointer[values.Count] = null;
    }

    public byte** Pointer { get; }

    public void Dispose()
    {
        foreach (var s in _strings)
            Marshal.FreeHGlobal(s);
        NativeMemory.Free(Pointer);
    }
}
