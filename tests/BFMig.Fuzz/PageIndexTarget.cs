using System.Buffers.Binary;
using System.Text;
using BFMig.Transfer.Memory;
using BFMig.Transfer.Wire;

namespace BFMig.Fuzz;

/// <summary>
/// A receiver's page index as a hostile or broken receiver might send it (issue 15): frames read
/// by <see cref="PeerPageIndex.ReadAsync"/> with 16 MiB of RAM allowed. Allowed failure:
/// <see cref="PeerProtocolException"/>; what is allocated stays within what the allowed RAM may
/// describe (16 bytes per page) plus the frame buffers.
/// </summary>
internal static class PageIndexTarget
{
    private const long MaxRam = 16 << 20;

    public static List<byte[]> Corpus()
    {
        var head = new List<byte>(Enumerable.Range(0, 32).Select(i => (byte)i));
        head.AddRange(new byte[] { 0, 0, 0, 0, 0, 0, 0x12, 0x34, 0, 0, 0, 0, 0, 0, 0, 3, 2 });
        foreach (var (name, pages) in new[] { ("pc.ram", 3), ("vga.vram", 1) })
        {
            head.Add((byte)name.Length);
            head.AddRange(Encoding.UTF8.GetBytes(name));
            var len = new byte[8];
            BinaryPrimitives.WriteUInt64BigEndian(len, (ulong)pages * 4096);
            head.AddRange(len);
        }
        byte[] Pages(uint block, ulong first, int count)
        {
            var b = new byte[12 + count * 16];
            BinaryPrimitives.WriteUInt32BigEndian(b, block);
            BinaryPrimitives.WriteUInt64BigEndian(b.AsSpan(4), first);
            for (int i = 12; i < b.Length; i++) b[i] = (byte)(i * 31);
            return b;
        }
        return
        [
            [.. HelloTarget.Framed(FrameType.PageIndexHead, [.. head]), .. HelloTarget.Framed(FrameType.PageIndexPages, Pages(0, 0, 2)),
                .. HelloTarget.Framed(FrameType.PageIndexPages, Pages(0, 2, 1)), .. HelloTarget.Framed(FrameType.PageIndexPages, Pages(1, 0, 1))],
            [.. HelloTarget.Framed(FrameType.PageIndexHead, [.. head]), .. HelloTarget.Framed(FrameType.PageIndexPages, Pages(0, 0, 3))],
        ];
    }

    public static void Run(byte[] input, Random r)
    {
        var budget = Budget.Start(4 << 20, "page-index");
        try
        {
            using var reader = new FrameReader(new MemoryStream(input), TimeSpan.FromSeconds(5));
            var index = PeerPageIndex.ReadAsync(reader, MaxRam, default).GetAwaiter().GetResult();
            if (index.KnownPages > MaxRam / 4096) throw new InvalidOperationException($"an index of {index.KnownPages} pages within {MaxRam} bytes of RAM");
        }
        catch (PeerProtocolException)
        {
        }
        budget.Check(MaxRam / 4096 * 16);
    }
}
