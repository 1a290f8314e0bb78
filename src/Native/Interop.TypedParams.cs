using System.Runtime.InteropServices;
using BFMig.Native.Libvirt;

namespace BFMig.Native;

internal static partial class Interop
{
    internal static partial class Libvirt
    {
        /// <summary>VIR_TYPED_PARAM_FIELD_LENGTH.</summary>
        internal const int TypedParamFieldLength = 80;

        /// <summary>
        /// struct _virTypedParameter (libvirt-common.h): char field[80]; int type; then an 8-byte
        /// union {int, unsigned, long long, unsigned long long, double, char, char*} at offset 88.
        /// </summary>
        [StructLayout(LayoutKind.Explicit, Size = 96)]
        internal unsafe struct VirTypedParameter
        {
            [FieldOffset(0)] public fixed byte Field[TypedParamFieldLength];
            [FieldOffset(80)] public int Type;
            [FieldOffset(88)] public int I;
            [FieldOffset(88)] public uint UI;
            [FieldOffset(88)] public long L;
            [FieldOffset(88)] public ulong UL;
            [FieldOffset(88)] public double D;
            [FieldOffset(88)] public byte B;
            [FieldOffset(88)] public byte* S;
        }

        [LibraryImport(Library)]
        private static unsafe partial void virTypedParamsFree(VirTypedParameter* parameters, int nparams);

        [LibraryImport(Library, StringMarshalling = StringMarshalling.Utf8)]
        private static unsafe partial int virTypedParamsAddInt(VirTypedParameter** parameters, int* nparams, int* maxparams, string name, int value);

        [LibraryImport(Library, StringMarshalling = StringMarshalling.Utf8)]
        private static unsafe partial int virTypedParamsAddUInt(VirTypedParameter** parameters, int* nparams, int* maxparams, string name, uint value);

        [LibraryImport(Library, StringMarshalling = StringMarshalling.Utf8)]
        private static unsafe partial int virTypedParamsAddLLong(VirTypedParameter** parameters, int* nparams, int* maxparams, string name, long value);

        [LibraryImport(Library, StringMarshalling = StringMarshalling.Utf8)]
        private static unsafe partial int virTypedParamsAddULLong(VirTypedParameter** parameters, int* nparams, int* maxparams, string name, ulong value);

        [LibraryImport(Library, StringMarshalling = StringMarshalling.Utf8)]
        private static unsafe partial int virTypedParamsAddDouble(VirTypedParameter** parameters, int* nparams, int* maxparams, string name, double value);

        [LibraryImport(Library, StringMarshalling = StringMarshalling.Utf8)]
        private static unsafe partial int virTypedParamsAddBoolean(VirTypedParameter** parameters, int* nparams, int* maxparams, string name, int value);

        [LibraryImport(Library, StringMarshalling = StringMarshalling.Utf8)]
        private static unsafe partial int virTypedParamsAddString(VirTypedParameter** parameters, int* nparams, int* maxparams, string name, string value);

        internal static unsafe void TypedParamsFree(VirTypedParameter* parameters, int count) => virTypedParamsFree(parameters, count);

        /// <summary>
        /// A typed-parameter array built by libvirt's own virTypedParamsAdd* (so allocation and
        /// string ownership match what virTypedParamsFree expects). Not thread-safe.
        /// </summary>
        internal sealed unsafe class TypedParameterList : IDisposable
        {
            private VirTypedParameter* _params;
            private int _count;
            private int _max;

            public VirTypedParameter* Pointer => _params;

            public int Count => _count;

            public void Add(LibvirtTypedParameter parameter)
            {
                ObjectDisposedException.ThrowIf(_count < 0, this);
                fixed (VirTypedParameter** p = &_params)
                fixed (int* n = &_count, max = &_max)
                {
                    int rc = parameter.Value switch
                    {
                        int v => virTypedParamsAddInt(p, n, max, parameter.Name, v),
                        uint v => virTypedParamsAddUInt(p, n, max, parameter.Name, v),
                        long v => virTypedParamsAddLLong(p, n, max, parameter.Name, v),
                        ulong v => virTypedParamsAddULLong(p, n, max, parameter.Name, v),
                        double v => virTypedParamsAddDouble(p, n, max, parameter.Name, v),
                        bool v => virTypedParamsAddBoolean(p, n, max, parameter.Name, v ? 1 : 0),
                        string v => virTypedParamsAddString(p, n, max, parameter.Name, v),
                        _ => throw new ArgumentException(
                            $"typed parameter '{parameter.Name}' has unsupported value type {parameter.Value.GetType().Name}", nameof(parameter)),
                    };
                    Check(rc, "TypedParamsAdd");
                }
            }

            public void Dispose()
            {
                if (_params != null)
                {
                    virTypedParamsFree(_params, _count);
                    _params = null;
                }
                _count = -1;
            }
        }

        /// <summary>Copies a typed-parameter array into managed values (the caller still frees it).</summary>
        internal static unsafe LibvirtTypedParameter[] ReadTypedParams(VirTypedParameter* parameters, int count)
        {
            var result = new LibvirtTypedParameter[count];
            for (int i = 0; i < count; i++)
            {
                VirTypedParameter* p = &parameters[i];
                int length = new ReadOnlySpan<byte>(p->Field, TypedParamFieldLength).IndexOf((byte)0);
                string name = System.Text.Encoding.UTF8.GetString(p->Field, length < 0 ? TypedParamFieldLength : length);
                object value = (LibvirtTypedParameterType)p->Type switch
                {
                    LibvirtTypedParameterType.Int => p->I,
                    LibvirtTypedParameterType.UInt => p->UI,
                    LibvirtTypedParameterType.LLong => p->L,
                    LibvirtTypedParameterType.ULLong => p->UL,
                    LibvirtTypedParameterType.Double => p->D,
                    LibvirtTypedParameterType.Boolean => p->B != 0,
                    LibvirtTypedParameterType.String => Marshal.PtrToStringUTF8((nint)p->S) ?? "",
                    _ => throw new InvalidDataException(
                        $"libvirt typed parameter #{i} '{name}' has unknown type {p->Type}"),
                };
                result[i] = new LibvirtTypedParameter(name, value);
            }
            return result;
        }
    }
}
