namespace BFMig.Native.DBus;

/// <summary>
/// Reads the arguments of an incoming sd-bus message in order. Only valid inside the callback that
/// received it. Reading the wrong type throws <see cref="DBusException"/> (errno ENXIO) and the
/// caller should answer InvalidArgs.
/// </summary>
public readonly unsafe struct DBusMessageReader
{
    private readonly nint _message;

    internal DBusMessageReader(nint message) => _message = message;

    /// <summary>The complete signature of the message body.</summary>
    public string Signature => Interop.SdBus.PtrToString(Interop.SdBus.sd_bus_message_get_signature(_message, 1)) ?? "";

    private void Read(char type, void* value)
    {
        int rc = Interop.SdBus.sd_bus_message_read_basic(_message, (byte)type, value);
        Interop.SdBus.Check(rc, $"read '{type}'");
        if (rc == 0)
        {
            throw new DBusException(DBusErrorNames.InvalidArgs, $"expected '{type}' but the message (signature '{Signature}') has no more arguments here");
        }
    }

    public byte ReadByte()
    {
        byte v;
        Read('y', &v);
        return v;
    }

    public bool ReadBool()
    {
        int v;
        Read('b', &v);
        return v != 0;
    }

    public short ReadInt16()
    {
        short v;
        Read('n', &v);
        return v;
    }

    public ushort ReadUInt16()
    {
        ushort v;
        Read('q', &v);
        return v;
    }

    public int ReadInt32()
    {
        int v;
        Read('i', &v);
        return v;
    }

    public uint ReadUInt32()
    {
        uint v;
        Read('u', &v);
        return v;
    }

    public long ReadInt64()
    {
        long v;
        Read('x', &v);
        return v;
    }

    public ulong ReadUInt64()
    {
        ulong v;
        Read('t', &v);
        return v;
    }

    public double ReadDouble()
    {
        double v;
        Read('d', &v);
        return v;
    }

    public string ReadString() => ReadStringOf('s');

    public string ReadObjectPath() => ReadStringOf('o');

    public string ReadSignature() => ReadStringOf('g');

    /// <summary>A file descriptor owned by the message: dup it to keep it.</summary>
    public int ReadUnixFd()
    {
        int v;
        Read('h', &v);
        return v;
    }

    private string ReadStringOf(char type)
    {
        byte* p;
        Read(type, &p);
        return Interop.SdBus.PtrToString(p) ?? "";
    }

    /// <summary>The type of the next argument ('\0' at the end of the current container) and, for containers, their contents signature.</summary>
    public (char Type, string? Contents) PeekType()
    {
        byte type;
        byte* contents;
        int rc = Interop.SdBus.Check(Interop.SdBus.sd_bus_message_peek_type(_message, &type, &contents), "peek type");
        return rc == 0 ? ('\0', null) : ((char)type, Interop.SdBus.PtrToString(contents));
    }

    /// <summary>True when the current container (or the body) has no more arguments.</summary>
    public bool AtEnd => Interop.SdBus.Check(Interop.SdBus.sd_bus_message_at_end(_message, 0), "at end") > 0;

    /// <summary>Enters an array; false if the current container has no more arguments.</summary>
    public bool EnterArray(string elementSignature) => Enter('a', elementSignature);

    /// <summary>Enters a struct; false at the end of the enclosing array.</summary>
    public bool EnterStruct(string contents) => Enter('r', contents);

    /// <summary>Enters a dictionary entry; false at the end of the enclosing array.</summary>
    public bool EnterDictEntry(string contents) => Enter('e', contents);

    /// <summary>Enters a variant; <paramref name="signature"/> null accepts any contents (peek it first).</summary>
    public bool EnterVariant(string? signature = null) => Enter('v', signature);

    private bool Enter(char type, string? contents) =>
        Interop.SdBus.Check(Interop.SdBus.sd_bus_message_enter_container(_message, (byte)type, contents), $"enter '{type}{contents}'") > 0;

    public void ExitContainer() => Interop.SdBus.Check(Interop.SdBus.sd_bus_message_exit_container(_message), "exit container");

    /// <summary>Skips the next argument(s) of the given signature (null: one complete type).</summary>
    public void Skip(string? signature = null) => Interop.SdBus.Check(Interop.SdBus.sd_bus_message_skip(_message, signature), "skip");

    public string[] ReadStringArray()
    {
        var result = new List<string>();
        if (EnterArray("s"))
        {
            while (!AtEnd)
            {
                result.Add(ReadString());
            }
            ExitContainer();
        }
        return [.. result];
    }

    /// <summary>Reads an <c>a{ss}</c>.</summary>
    public Dictionary<string, string> ReadStringDictionary()
    {
        var result = new Dictionary<string, string>(StringComparer.Ordinal);
        if (EnterArray("{ss}"))
        {
            while (EnterDictEntry("ss"))
            {
                string key = ReadString();
                result[key] = ReadString();
                ExitContainer();
            }
            ExitContainer();
        }
        return result;
    }

    /// <summary>Reads a variant of a basic type into the matching .NET type (see <see cref="DBusMessageWriter.WriteVariant"/>).</summary>
    public object ReadVariant()
    {
        var (_, contents) = PeekType();
        if (!EnterVariant(contents))
        {
            throw new DBusException(DBusErrorNames.InvalidArgs, "expected a variant");
        }
        object value = contents switch
        {
            "s" => ReadString(),
            "o" => ReadObjectPath(),
            "g" => ReadSignature(),
            "b" => ReadBool(),
            "y" => ReadByte(),
            "n" => ReadInt16(),
            "q" => ReadUInt16(),
            "i" => ReadInt32(),
            "u" => ReadUInt32(),
            "x" => ReadInt64(),
            "t" => ReadUInt64(),
            "d" => ReadDouble(),
            "as" => ReadStringArray(),
            _ => throw new DBusException(DBusErrorNames.InvalidArgs, $"variant of type '{contents}' is not supported here"),
        };
        ExitContainer();
        return value;
    }

    /// <summary>Reads an <c>a{sv}</c> of basic values.</summary>
    public Dictionary<string, object> ReadVariantDictionary()
    {
        var result = new Dictionary<string, object>(StringComparer.Ordinal);
        if (EnterArray("{sv}"))
        {
            while (EnterDictEntry("sv"))
            {
                string key = ReadString();
                result[key] = ReadVariant();
                ExitContainer();
            }
            ExitContainer();
        }
        return result;
    }
}
