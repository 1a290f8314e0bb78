using Tmds.DBus.Protocol;

namespace BFMig.Bus;

/// <summary>The variant types bfmig's <c>a{sv}</c> values use, to and from plain .NET values.</summary>
public static class Variants
{
    /// <summary>A .NET value as a variant; throws for a type the API does not use.</summary>
    public static VariantValue From(object value) => value switch
    {
        string s => VariantValue.String(s),
        bool b => VariantValue.Bool(b),
        byte y => VariantValue.Byte(y),
        short n => VariantValue.Int16(n),
        ushort q => VariantValue.UInt16(q),
        int i => VariantValue.Int32(i),
        uint u => VariantValue.UInt32(u),
        long x => VariantValue.Int64(x),
        ulong t => VariantValue.UInt64(t),
        double d => VariantValue.Double(d),
        string[] strings => VariantValue.Array(strings),
        IEnumerable<string> strings => VariantValue.Array(strings.ToArray()),
        _ => throw new ArgumentException($"cannot send a {value.GetType().Name} as a D-Bus variant", nameof(value)),
    };

    /// <summary>A received variant as a .NET value (string arrays as string[]; anything else as its text).</summary>
    public static object ToObject(VariantValue value) => value.Type switch
    {
        VariantValueType.String => value.GetString(),
        VariantValueType.Bool => value.GetBool(),
        VariantValueType.Byte => value.GetByte(),
        VariantValueType.Int16 => value.GetInt16(),
        VariantValueType.UInt16 => value.GetUInt16(),
        VariantValueType.Int32 => value.GetInt32(),
        VariantValueType.UInt32 => value.GetUInt32(),
        VariantValueType.Int64 => value.GetInt64(),
        VariantValueType.UInt64 => value.GetUInt64(),
        VariantValueType.Double => value.GetDouble(),
        VariantValueType.Array when value.ItemType == VariantValueType.String => value.GetArray<string>(),
        _ => value.ToString(),
    };

    /// <summary>Reads an <c>a{sv}</c> body into plain .NET values.</summary>
    public static Dictionary<string, object> ReadDictionary(ref Reader reader)
    {
        var result = new Dictionary<string, object>(StringComparer.Ordinal);
        foreach (var (key, value) in reader.ReadDictionaryOfStringToVariantValue())
            result[key] = ToObject(value);
        return result;
    }

    /// <summary>Writes <c>a{sv}</c>.</summary>
    public static void WriteDictionary(ref MessageWriter writer, IEnumerable<KeyValuePair<string, object>> values)
    {
        ArrayStart start = writer.WriteDictionaryStart();
        foreach (var (key, value) in values)
        {
            writer.WriteDictionaryEntryStart();
            writer.WriteString(key);
            writer.WriteVariant(From(value));
        }
        writer.WriteDictionaryEnd(start);
    }
}
