using System.Text;

namespace BFMig.Native.DBus;

/// <summary>
/// Appends arguments to an outgoing sd-bus message. Only valid inside the callback that received
/// it (the message is sent right after). Containers: Open*, write the contents, <see cref="CloseContainer"/>.
/// </summary>
public readonly unsafe struct DBusMessageWriter
{
    private readonly nint _message;

    internal DBusMessageWriter(nint message) => _message = message;

    private void Append(char type, void* value) =>
        Interop.SdBus.Check(Interop.SdBus.sd_bus_message_append_basic(_message, (byte)type, value), $"append '{type}'");

    public void WriteByte(byte value) => Append('y', &value);

    /// <summary>D-Bus booleans travel as 32-bit integers.</summary>
    public void WriteBool(bool value)
    {
        int v = value ? 1 : 0;
        Append('b', &v);
    }

    public void WriteInt16(short value) => Append('n', &value);

    public void WriteUInt16(ushort value) => Append('q', &value);

    public void WriteInt32(int value) => Append('i', &value);

    public void WriteUInt32(uint value) => Append('u', &value);

    public void WriteInt64(long value) => Append('x', &value);

    public void WriteUInt64(ulong value) => Append('t', &value);

    public void WriteDouble(double value) => Append('d', &value);

    public void WriteString(string value) => AppendString('s', value);

    public void WriteObjectPath(string value) => AppendString('o', value);

    public void WriteSignature(string value) => AppendString('g', value);

    /// <summary>Passes a file descriptor (sd-bus duplicates it; the caller keeps its own).</summary>
    public void WriteUnixFd(int fd) => Append('h', &fd);

    private void AppendString(char type, string value)
    {
        ArgumentNullException.ThrowIfNull(value);
        // For string types sd_bus_message_append_basic takes the string itself, not a pointer to it.
        int max = Encoding.UTF8.GetMaxByteCount(value.Length) + 1;
        byte[]? rented = null;
        Span<byte> buffer = max <= 512 ? stackalloc byte[max] : (rented = System.Buffers.ArrayPool<byte>.Shared.Rent(max));
        try
        {
            int length = Encoding.UTF8.GetBytes(value, buffer);
            if (buffer[..length].Contains((byte)0))
            {
                throw new ArgumentException($"D-Bus strings cannot contain NUL (type '{type}')", nameof(value));
            }
            buffer[length] = 0;
            fixed (byte* p = buffer)
            {
                Append(type, p);
            }
        }
        finally
        {
            if (rented is not null)
            {
                System.Buffers.ArrayPool<byte>.Shared.Return(rented);
            }
        }
    }

    /// <summary>Opens an array of elements with signature <paramref name="elementSignature"/> (e.g. "s", "{sv}").</summary>
    public void OpenArray(string elementSignature) => Open('a', elementSignature);

    /// <summary>Opens a struct whose members have signature <paramref name="contents"/> (without parentheses).</summary>
    public void OpenStruct(string contents) => Open('r', contents);

    /// <summary>Opens a dictionary entry (inside an array of "{..}") with key+value signature <paramref name="contents"/>.</summary>
    public void OpenDictEntry(string contents) => Open('e', contents);

    /// <summary>Opens a variant holding one value of signature <paramref name="signature"/>.</summary>
    public void OpenVariant(string signature) => Open('v', signature);

    private void Open(char type, string contents) =>
        Interop.SdBus.Check(Interop.SdBus.sd_bus_message_open_container(_message, (byte)type, contents), $"open container '{type}{contents}'");

    public void CloseContainer() => Interop.SdBus.Check(Interop.SdBus.sd_bus_message_close_container(_message), "close container");

    public void WriteStringArray(IEnumerable<string> values)
    {
        ArgumentNullException.ThrowIfNull(values);
        OpenArray("s");
        foreach (string value in values)
        {
            WriteString(value);
        }
        CloseContainer();
    }

    /// <summary>Writes an <c>a{ss}</c>.</summary>
    public void WriteStringDictionary(IEnumerable<KeyValuePair<string, string>> values)
    {
        ArgumentNullException.ThrowIfNull(values);
        OpenArray("{ss}");
        foreach (var (key, value) in values)
        {
            OpenDictEntry("ss");
            WriteString(key);
            WriteString(value);
            CloseContainer();
        }
        CloseContainer();
    }

    /// <summary>
    /// Writes a variant of a basic value: string, bool, byte, short, ushort, int, uint, long,
    /// ulong or double (the .NET type picks the D-Bus type).
    /// </summary>
    public void WriteVariant(object value)
    {
        switch (value)
        {
            case string s: OpenVariant("s"); WriteString(s); break;
            case bool b: OpenVariant("b"); WriteBool(b); break;
            case byte y: OpenVariant("y"); WriteByte(y); break;
            case short n: OpenVariant("n"); WriteInt16(n); break;
            case ushort q: OpenVariant("q"); WriteUInt16(q); break;
            case int i: OpenVariant("i"); WriteInt32(i); break;
            case uint u: OpenVariant("u"); WriteUInt32(u); break;
            case long x: OpenVariant("x"); WriteInt64(x); break;
            case ulong t: OpenVariant("t"); WriteUInt64(t); break;
            case double d: OpenVariant("d"); WriteDouble(d); break;
            default: throw new ArgumentException($"no D-Bus variant mapping for {value?.GetType().Name ?? "null"}", nameof(value));
        }
        CloseContainer();
    }

    /// <summary>Writes an <c>a{sv}</c> of basic values (see <see cref="WriteVariant"/>).</summary>
    public void WriteVariantDictionary(IEnumerable<KeyValuePair<string, object>> values)
    {
        ArgumentNullException.ThrowIfNull(values);
        OpenArray("{sv}");
        foreach (var (key, value) in values)
        {
            OpenDictEntry("sv");
            WriteString(key);
            WriteVariant(value);
            CloseContainer();
        }
        CloseContainer();
    }
}
