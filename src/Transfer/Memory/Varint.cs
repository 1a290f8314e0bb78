namespace BFMig.Transfer.Memory;

/// <summary>ULEB128 integers of the op stream.</summary>
internal static class Varint
{
    public static int Write(Span<byte> dst, ulong value)
    {
        int i = 0;
        while (value >= 0x80)
        {
            dst[i++] = (byte)(value | 0x80);
            value >>= 7;
        }
        dst[i++] = (byte)value;
        return i;
    }

    /// <summary>Reads one varint; returns false on truncation or more than 10 bytes.</summary>
    public static bool TryRead(ReadOnlySpan<byte> src, ref int pos, out ulong value)
    {
        value = 0;
        for (int shift = 0; shift < 64; shift += 7)
        {
            if (pos >= src.Length) return false;
            byte b = src[pos++];
            value |= (ulong)(b & 0x7f) << shift;
            if ((b & 0x80) == 0) return shift < 63 || b <= 1;
        }
        return false;
    }
}
