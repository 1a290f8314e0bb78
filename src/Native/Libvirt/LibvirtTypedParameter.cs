namespace BFMig.Native.Libvirt;

/// <summary>virTypedParameterType.</summary>
public enum LibvirtTypedParameterType
{
    Int = 1,
    UInt = 2,
    LLong = 3,
    ULLong = 4,
    Double = 5,
    Boolean = 6,
    String = 7,
}

/// <summary>
/// One libvirt typed parameter. <see cref="Value"/> is an <see cref="int"/>, <see cref="uint"/>,
/// <see cref="long"/>, <see cref="ulong"/>, <see cref="double"/>, <see cref="bool"/> or
/// <see cref="string"/>, matching the libvirt type (the .NET type decides the libvirt type when sending).
/// </summary>
public sealed record LibvirtTypedParameter(string Name, object Value)
{
    /// <summary>The value as an unsigned 64-bit number, whatever integer type libvirt used.</summary>
    public ulong? AsUInt64() => Value switch
    {
        ulong v => v,
        long v when v >= 0 => (ulong)v,
        uint v => v,
        int v when v >= 0 => (ulong)v,
        _ => null,
    };
}
