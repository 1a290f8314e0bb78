using BFMig.Transfer.Memory;

namespace BFMig.Fuzz;

/// <summary>
/// A multifd channel from a hostile or damaged source: <see cref="MultifdChannelParser"/> fed in
/// random chunks. It must never throw, must account for every byte, must bound every non-raw
/// segment, and must cut the same input the same way whatever the chunks (the sender and the
/// receiver see different chunks of one channel). Synthetic channels of QEMU 7.2's and 10.0's
/// layouts seed it.
/// </summary>
internal static class MultifdTarget
{
    public static List<byte[]> Corpus()
    {
        var uuid = Guid.Parse("0f3c1d2e-4b5a-6978-8a9b-acbdcedf0102");
        var init = new MultifdInit(1, uuid).Encode();
        var page = Enumerable.Range(0, 4096).Select(i => (byte)(i * 7)).ToArray();
        byte[] Packet(uint flags, string block, ulong[] normal, ulong[] zero) =>
            [.. new MultifdPacket(flags, 3, block, normal, zero).EncodeHeader(), .. normal.SelectMany(_ => page)];
        return
        [
            // 7.2: normal pages only, a sync packet without pages.
            [.. init, .. Packet(0, "pc.ram", [0x1000, 0x2000], []), .. Packet(MultifdFormat.FlagSync, "pc.ram", [], [])],
            // 10.0: zero pages listed after the normal ones.
            [.. init, .. Packet(0, "pc.ram", [0x3000], [0x0, 0x5000]), .. Packet(0, "/rom@etc/acpi/tables", [0x0], [])],
            // Compressed (zstd flag): not understood, carried.
            [.. init, .. Packet(2 << 1, "pc.ram", [0x1000], [])],
        ];
    }

    public static void Run(byte[] input, Random r)
    {
        var budget = Budget.Start(1 << 20, "multifd");
        var first = Cut(input, r, whole: false);
        var again = Cut(input, r, whole: true);
        if (!first.SequenceEqual(again))
            throw new InvalidOperationException("the same channel was cut differently in different chunks");
        budget.Check(input.Length * 4L);
    }

    private static List<(MultifdSegmentKind, int, ulong)> Cut(byte[] input, Random r, bool whole)
    {
        var parser = new MultifdChannelParser();
        var segments = new List<(MultifdSegmentKind, int, ulong)>();
        int start = 0, end = whole ? input.Length : 0;
        while (true)
        {
            bool final = end == input.Length;
            while (parser.TryRead(input.AsSpan(start, end - start), final, out var seg))
            {
                if (seg.Length <= 0 || start + seg.Length > end) throw new InvalidOperationException($"segment of {seg.Length} bytes at {start} beyond {end}");
                if (seg.Kind != MultifdSegmentKind.Raw && seg.Length > MultifdChannelParser.MaxSegmentLength)
                    throw new InvalidOperationException($"{seg.Kind} segment of {seg.Length} bytes at {start}");
                if (seg.Kind == MultifdSegmentKind.Page && (seg.Length != 4096 || seg.Offset % 4096 != 0))
                    throw new InvalidOperationException("page segment");
                // Raw runs are cut by the chunks, not by the format: compare them as one.
                if (seg.Kind == MultifdSegmentKind.Raw && segments.Count > 0 && segments[^1].Item1 == MultifdSegmentKind.Raw)
                    segments[^1] = (MultifdSegmentKind.Raw, segments[^1].Item2 + seg.Length, 0);
                else
                    segments.Add((seg.Kind, seg.Length, seg.Kind == MultifdSegmentKind.Page ? seg.Offset : 0));
                start += seg.Length;
            }
            if (final) break;
            end = Math.Min(input.Length, end + 1 + r.Next(70_000));
        }
        if (start != input.Length) throw new InvalidOperationException($"parser stopped at {start} of {input.Length}");
        return segments;
    }
}
