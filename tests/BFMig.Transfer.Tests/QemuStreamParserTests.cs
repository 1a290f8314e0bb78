using BFMig.Transfer.Memory;


namespace BFMig.Transfer.Tests;

public class QemuStreamParserTests
{
    private static List<(QemuSegment Seg, byte[] Bytes)> ParseAll(byte[] input, int chunk = int.MaxValue)
    {
        // Feeds the parser the way a socket would: growing windows of at most `chunk` new bytes.
        var parser = new QemuStreamParser();
        var result = new List<(QemuSegment, byte[])>();
        int start = 0, end = 0;
        while (true)
        {
            bool final = end == input.Length;
            while (parser.TryRead(input.AsSpan(start, end - start), final, out var seg))
            {
                result.Add((seg, input.AsSpan(start, seg.Length).ToArray()));
                start += seg.Length;
            }
            if (final) break;
            end = (int)Math.Min(input.Length, (long)end + chunk);
        }
        Assert.Equal(input.Length, start);
        return result;
    }

    private static readonly byte[] Page1 = Enumerable.Range(0, 4096).Select(i => (byte)(i * 7)).ToArray();

    private static byte[] Sample() => new StreamBuilder().Header()
        .RamStart(("pc.ram", 8 * 4096), ("pc.bios", 4096))
        .Part().Zero(0, 0).Page(0, 1, Page1).Xbzrle(0, 2, [0, 2, 9, 9]).Page(1, 0, Page1).Eos().Footer()
        .End().Page(0, 3, Page1).Eos().Footer().DeviceStateAndEof().ToArray();

    [Fact]
    public void Literal_header_and_configuration_bytes()
    {
        var s = new StreamBuilder().Header("pc").ToArray();
        Assert.Equal(new byte[] { 0x51, 0x45, 0x56, 0x4d, 0, 0, 0, 3, 0x07, 0, 0, 0, 2, (byte)'p', (byte)'c' }, s);
        var segs = ParseAll(s);
        Assert.Equal([8, 7], segs.Select(x => x.Seg.Length));
    }

    [Fact]
    public void Sample_stream_is_cut_into_the_expected_segments()
    {
        var input = Sample();
        var parser = new QemuStreamParser();
        var segs = ParseAll(input);
        var pages = segs.Where(s => s.Seg.Kind == SegmentKind.Page).Select(s => (s.Seg.BlockIndex, s.Seg.PageIndex, s.Seg.Continue)).ToList();
        Assert.Equal([(0, 1L, true), (1, 0L, false), (0, 3L, false)], pages);
        var facts = segs.Where(s => s.Seg.Fact != PageFact.None).Select(s => (s.Seg.Fact, s.Seg.PageIndex)).ToList();
        Assert.Equal([(PageFact.Zero, 0L), (PageFact.Unknown, 2L)], facts);
        Assert.Single(segs, s => s.Seg.Kind == SegmentKind.BlocksDefined);
        Assert.Equal(input, segs.SelectMany(s => s.Bytes).ToArray());
        var page = segs.First(s => s.Seg.Kind == SegmentKind.Page);
        Assert.Equal(Page1, page.Bytes[page.Seg.HeaderLength..]);
    }

    [Fact]
    public void State_after_sample_reports_blocks_completion_and_device_state()
    {
        var parser = new QemuStreamParser();
        var input = Sample();
        int pos = 0;
        while (parser.TryRead(input.AsSpan(pos), true, out var seg)) pos += seg.Length;
        Assert.Equal(["pc.ram", "pc.bios"], parser.Blocks.Select(b => b.Name));
        Assert.Equal(8, parser.Blocks[0].PageCount);
        Assert.True(parser.RamComplete);
        Assert.True(parser.IsOpaque);
        Assert.Equal("device state", parser.OpaqueReason);
    }

    [Theory]
    [InlineData(1)]
    [InlineData(7)]
    [InlineData(4099)]
    public void Feeding_in_small_chunks_gives_the_same_segments(int chunk)
    {
        var input = Sample();
        // Opaque raw bytes come as they arrive, so compare with adjacent plain raw segments merged.
        Assert.Equal(Merged(ParseAll(input)), Merged(ParseAll(input, chunk)));
    }

    private static List<QemuSegment> Merged(List<(QemuSegment Seg, byte[] Bytes)> segs)
    {
        var r = new List<QemuSegment>();
        foreach (var (s, _) in segs)
        {
            if (r.Count > 0 && s.Kind == SegmentKind.Raw && s.Fact == PageFact.None && r[^1].Kind == SegmentKind.Raw && r[^1].Fact == PageFact.None)
                r[^1] = r[^1] with { Length = r[^1].Length + s.Length };
            else
                r.Add(s);
        }
        return r;
    }

    // The dirty-bitmap section as QEMU 7.2/10.0 write it when libvirt migrates persistent bitmaps
    // (checkpoints): START section after ram's setup, BITS/COMPLETE chunks in its END section.
    private static StreamBuilder BitmapStart(StreamBuilder b) => b
        .U8(QemuFormat.SectionStart).Be32(3).Str8("dirty-bitmap").Be32(0).Be32(1)
        .U8(0x1c).Str8("libvirt-1-format").Str8("c1").Be32(65536).U8(0x03)
        .U8(0x1c).Str8("libvirt-1-format").Str8("bfmig/x").Be32(65536).U8(0x01)
        .U8(0x01).U8(QemuFormat.SectionFooter).Be32(3);

    private static StreamBuilder BitmapEnd(StreamBuilder b) => b
        .U8(QemuFormat.SectionEnd).Be32(3)
        .U8(0x4e).Str8("libvirt-1-format").Str8("c1").Be64(0).Be32(128)
        .U8(0x40).Be64(128).Be32(128).Be64(16).Bytes(new byte[16])
        .U8(0x2c).Str8("libvirt-1-format").Str8("c1")
        .U8(0x01).U8(QemuFormat.SectionFooter).Be32(3);

    private static byte[] WithBitmaps()
    {
        var b = new StreamBuilder().Header().RamStart(("pc.ram", 8 * 4096), ("pc.bios", 4096));
        BitmapStart(b).Part().Zero(0, 0).Page(0, 1, Page1).Eos().Footer();
        BitmapEnd(b).End().Page(0, 3, Page1).Eos().Footer();
        return b.DeviceStateAndEof().ToArray();
    }

    [Theory]
    [InlineData(int.MaxValue)]
    [InlineData(1)]
    [InlineData(7)]
    public void Dirty_bitmap_sections_are_carried_and_the_pages_after_them_still_parsed(int chunk)
    {
        var parser = new QemuStreamParser();
        var input = WithBitmaps();
        int start = 0, end = 0;
        var facts = new List<(PageFact, long)>();
        string? reasonBeforeDeviceState = null;
        while (true)
        {
            bool final = end == input.Length;
            while (parser.TryRead(input.AsSpan(start, end - start), final, out var seg))
            {
                if (seg.Fact != PageFact.None) facts.Add((seg.Fact, seg.PageIndex));
                if (seg.Kind == SegmentKind.Page) facts.Add((PageFact.None, seg.PageIndex));
                if (!parser.RamComplete) reasonBeforeDeviceState ??= parser.OpaqueReason;
                start += seg.Length;
            }
            if (final) break;
            end = (int)Math.Min(input.Length, (long)end + chunk);
        }
        Assert.Equal(input.Length, start);
        Assert.Null(reasonBeforeDeviceState);
        Assert.Equal([(PageFact.Zero, 0L), (PageFact.None, 1L), (PageFact.None, 3L)], facts);
        Assert.True(parser.RamComplete);
        Assert.Equal("device state", parser.OpaqueReason);
    }

    [Fact]
    public void Dirty_bitmap_chunk_with_extra_flags_or_absurd_size_falls_back_without_losing_bytes()
    {
        var extra = new StreamBuilder().Header().RamStart(("pc.ram", 4096))
            .U8(QemuFormat.SectionStart).Be32(3).Str8("dirty-bitmap").Be32(0).Be32(1).U8(0x80).U8(0x01).ToArray();
        var segs = ParseAll(extra);
        Assert.Equal(extra, segs.SelectMany(s => s.Bytes).ToArray());
        var parser = new QemuStreamParser();
        foreach (var input in new[] { extra })
        {
            int at = 0;
            while (parser.TryRead(input.AsSpan(at), true, out var seg)) at += seg.Length;
        }
        Assert.Contains("dirty-bitmap chunk with extra flags 0x80", parser.OpaqueReason);

        var huge = new StreamBuilder().Header().RamStart(("pc.ram", 4096))
            .U8(QemuFormat.SectionStart).Be32(3).Str8("dirty-bitmap").Be32(0).Be32(1)
            .U8(0x40).Be64(0).Be32(8).Be64(1UL << 40).ToArray();
        var p2 = new QemuStreamParser();
        int at2 = 0;
        while (p2.TryRead(huge.AsSpan(at2), true, out var seg)) at2 += seg.Length;
        Assert.Equal(huge.Length, at2);
        Assert.Contains("dirty-bitmap chunk of 1099511627776 bytes", p2.OpaqueReason);
    }

    [Fact]
    public void Incomplete_record_consumes_nothing()
    {
        var input = Sample();
        var parser = new QemuStreamParser();
        int pos = 0;
        // Walk up to the first PAGE record, then offer it one byte short.
        while (parser.TryRead(input.AsSpan(pos), false, out var seg))
        {
            if (seg.Kind == SegmentKind.Page)
            {
                var p2 = new QemuStreamParser();
                int q = 0;
                while (q < pos && p2.TryRead(input.AsSpan(q, pos - q), false, out var s2)) q += s2.Length;
                Assert.False(p2.TryRead(input.AsSpan(pos, seg.Length - 1), false, out _));
                Assert.Equal(pos, p2.Position);
                Assert.True(p2.TryRead(input.AsSpan(pos, seg.Length), false, out var again));
                Assert.Equal(seg, again);
                return;
            }
            pos += seg.Length;
        }
        Assert.Fail("no page record found");
    }

    [Fact]
    public void Multifd_channel_is_carried_opaquely()
    {
        var input = new StreamBuilder().Be32(QemuFormat.MultifdMagic).Be32(1).Bytes(new byte[100]).ToArray();
        var parser = new QemuStreamParser();
        // First the zero-length marker (a memory sender's End goes here), once; then the bytes.
        Assert.True(parser.TryRead(input, false, out var mark));
        Assert.Equal(new QemuSegment(SegmentKind.OpaqueFromHere, 0), mark);
        Assert.True(parser.TryRead(input, false, out var seg));
        Assert.Equal(SegmentKind.Raw, seg.Kind);
        Assert.Equal(input.Length, seg.Length);
        Assert.Equal("multifd channel", parser.OpaqueReason);
        Assert.False(parser.TryRead([], true, out _));
    }

    [Theory]
    [InlineData(0x400UL, "ram record flags 0x400")]        // unknown flag
    [InlineData(0x80UL, "ram record flags 0x80")]          // RDMA hook
    [InlineData(0x0aUL, "ram record flags 0xa")]           // ZERO|PAGE together
    public void Unknown_ram_flags_fall_back_to_opaque_without_losing_bytes(ulong flags, string reason)
    {
        var input = new StreamBuilder().Header().RamStart(("pc.ram", 4096)).Part().Be64(flags).Bytes(new byte[50]).ToArray();
        var segs = ParseAll(input);
        Assert.Equal(input, segs.SelectMany(s => s.Bytes).ToArray());
        var parser = new QemuStreamParser();
        int pos = 0;
        while (parser.TryRead(input.AsSpan(pos), true, out var s)) pos += s.Length;
        Assert.StartsWith(reason, parser.OpaqueReason);
        Assert.False(parser.RamComplete);
    }

    [Fact]
    public void Unknown_block_and_out_of_range_page_fall_back()
    {
        var a = new StreamBuilder().Header().RamStart(("pc.ram", 4096)).Part().Be64(8).Str8("nope").Bytes(new byte[4096]).ToArray();
        var b = new StreamBuilder().Header().RamStart(("pc.ram", 4096)).Part().Be64((5UL << 12) | 8).Str8("pc.ram").Bytes(new byte[4096]).ToArray();
        foreach (var (input, reason) in new[] { (a, "page record names unknown block 'nope'"), (b, "page offset 0x5000 beyond block") })
        {
            var parser = new QemuStreamParser();
            int pos = 0;
            while (parser.TryRead(input.AsSpan(pos), true, out var s)) pos += s.Length;
            Assert.Equal(input.Length, pos);
            Assert.StartsWith(reason, parser.OpaqueReason);
        }
    }

    [Fact]
    public void Bad_magic_version_and_absurd_lengths_fall_back()
    {
        var cases = new (byte[] Input, string Reason)[]
        {
            (new StreamBuilder().Be32(0xdeadbeef).Be32(3).ToArray(), "not a QEMU migration stream (magic 0xdeadbeef)"),
            (new StreamBuilder().Be32(QemuFormat.FileMagic).Be32(2).ToArray(), "unsupported stream version 2"),
            (new StreamBuilder().Be32(QemuFormat.FileMagic).Be32(3).U8(7).Be32(0xffffff00).ToArray(), "configuration name of 4294967040 bytes"),
            (new StreamBuilder().Header().RamStart(("pc.ram", 4096)).Part().Xbzrle(0, 0, new byte[5000]).ToArray(), "xbzrle header (flags 1, length 5000)"),
            (new StreamBuilder().Header().U8(0x42).ToArray(), "section type 0x42"),
            (new StreamBuilder().Header().U8(8).Be16(4).Be16(0).ToArray(), "command 4"),
        };
        foreach (var (input, reason) in cases)
        {
            var parser = new QemuStreamParser();
            int pos = 0;
            while (parser.TryRead(input.AsSpan(pos), true, out var s)) pos += s.Length;
            Assert.Equal(input.Length, pos);
            Assert.StartsWith(reason, parser.OpaqueReason);
        }
    }

    [Fact]
    public void MemSize_list_that_does_not_add_up_falls_back()
    {
        var input = new StreamBuilder().Header().U8(1).Be32(2).Str8("ram").Be32(0).Be32(4)
            .Be64((2 * 4096) | QemuFormat.FlagMemSize).Str8("pc.ram").Be64(3 * 4096).ToArray();
        var parser = new QemuStreamParser();
        int pos = 0;
        while (parser.TryRead(input.AsSpan(pos), true, out var s)) pos += s.Length;
        Assert.StartsWith("MEM_SIZE block entry not understood", parser.OpaqueReason);
    }

    [Fact]
    public void Truncated_stream_ends_as_raw_bytes()
    {
        var input = Sample()[..200];
        var segs = ParseAll(input);
        Assert.Equal(input, segs.SelectMany(s => s.Bytes).ToArray());
    }

    public static TheoryData<string> FixtureNames() => new(Fixtures.Streams);

    /// <summary>
    /// Parses the whole of <paramref name="input"/>, asserts that the segments put back together are
    /// the input byte for byte, and counts page records and zero and unknown page facts.
    /// </summary>
    private static (int Pages, int Zeros, int Unknown) ParseAndReassemble(byte[] input, QemuStreamParser parser)
    {
        int pos = 0, pages = 0, zeros = 0, unknown = 0;
        using var rebuilt = new MemoryStream();
        while (parser.TryRead(input.AsSpan(pos), true, out var seg))
        {
            rebuilt.Write(input, pos, seg.Length);
            pos += seg.Length;
            if (seg.Kind == SegmentKind.Page) pages++;
            if (seg.Fact == PageFact.Zero) zeros++;
            if (seg.Fact == PageFact.Unknown) unknown++;
        }
        Assert.Equal(input, rebuilt.ToArray());
        return (pages, zeros, unknown);
    }

    [Theory]
    [MemberData(nameof(FixtureNames))]
    public void Real_streams_parse_completely_and_reassemble_exactly(string name)
    {
        var input = Fixtures.Load(name);
        var parser = new QemuStreamParser();
        var (pages, zeros, unknown) = ParseAndReassemble(input, parser);
        Assert.True(parser.RamComplete, $"{name}: ram not complete, opaque because {parser.OpaqueReason}");
        Assert.Equal("device state", parser.OpaqueReason);
        Assert.Contains(parser.Blocks, b => b.Name == "pc.ram" && b.UsedLength == 32 << 20);
        Assert.True(pages > 40, $"{pages} pages");
        // Every page of the guest is announced at least once in the bulk stage (page or zero record).
        Assert.True(pages + zeros + unknown >= parser.Blocks.Sum(b => b.PageCount), $"{name}: {pages}+{zeros}+{unknown} records for {parser.Blocks.Sum(b => b.PageCount)} pages");
        if (name.Contains("xbzrle", StringComparison.Ordinal) && name.StartsWith("q10", StringComparison.Ordinal)) Assert.True(unknown > 1000, $"{unknown} xbzrle records");
    }

    /// <summary>
    /// QEMU 7.2 (<c>-machine pc -m 64 -S</c>, a virtio disk whose qcow2 holds persistent bitmaps
    /// c1 and c2, capability <c>dirty-bitmaps</c>, <c>migrate exec:cat</c>): the dirty-bitmap
    /// section comes right after ram's setup; every page after it is still parsed.
    /// </summary>
    [Fact]
    public void Real_qemu72_stream_with_persistent_bitmaps_is_parsed_through_the_dirty_bitmap_section()
    {
        var input = Fixtures.Load("q72-pc-bitmaps.bin");
        var parser = new QemuStreamParser();
        var (pages, zeros, _) = ParseAndReassemble(input, parser);
        Assert.True(parser.RamComplete, $"ram not complete, opaque because {parser.OpaqueReason}");
        Assert.Equal("device state", parser.OpaqueReason);
        Assert.Contains(parser.Blocks, b => b.Name == "pc.ram" && b.UsedLength == 64 << 20);
        Assert.True(pages + zeros >= parser.Blocks.Sum(b => b.PageCount), $"{pages}+{zeros} records for {parser.Blocks.Sum(b => b.PageCount)} pages");
    }

    [Fact]
    public void A_command_with_a_body_longer_than_a_record_turns_opaque_instead_of_one_huge_segment()
    {
        // Found by afl++ (scripts/fuzz-afl qemu): a PING with a 60,000-byte body came back as one raw segment.
        var header = new StreamBuilder().Header().ToArray();
        var command = new byte[5 + 60_000];
        command[0] = QemuFormat.Command;
        command[2] = (byte)QemuFormat.CmdPing;
        command[3] = 60_000 >> 8;
        command[4] = 60_000 & 0xff;
        var input = header.Concat(command).ToArray();
        var parser = new QemuStreamParser();
        int pos = 0;
        while (parser.TryRead(input.AsSpan(pos), true, out var seg))
        {
            Assert.True(parser.IsOpaque || seg.Length <= QemuStreamParser.MaxRecordLength, $"segment of {seg.Length} bytes");
            pos += seg.Length;
        }
        Assert.Equal(input.Length, pos);
        Assert.True(parser.IsOpaque);
        Assert.Contains("60000-byte body", parser.OpaqueReason);
    }

    /// <summary>
    /// Only a post-copy command (POSTCOPY_LISTEN to PACKAGED, 4 to 7, or a recovery's
    /// POSTCOPY_RESUME and RECV_BITMAP, 9 and 10; QEMU's enum qemu_vm_cmd) marks the stream
    /// post-copy, after which the sender lifts its idle timeout and pacing; POSTCOPY_ADVISE (3)
    /// comes with dirty bitmaps alone and is parsed through, and ENABLE_COLO (8) is opaque but
    /// not post-copy.
    /// </summary>
    [Theory]
    [InlineData(QemuFormat.CmdPostcopyAdvise, false, false)]
    [InlineData(QemuFormat.CmdPostcopyListen, true, true)]
    [InlineData(6, true, true)]
    [InlineData(QemuFormat.CmdPackaged, true, true)]
    [InlineData(QemuFormat.CmdEnableColo, true, false)]
    [InlineData(QemuFormat.CmdPostcopyResume, true, true)]
    [InlineData(QemuFormat.CmdRecvBitmap, true, true)]
    public void A_post_copy_command_marks_the_stream_post_copy(ushort cmd, bool opaque, bool postCopy)
    {
        var header = new StreamBuilder().Header().ToArray();
        byte[] command = [QemuFormat.Command, (byte)(cmd >> 8), (byte)cmd, 0, 0];
        var input = header.Concat(command).ToArray();
        var parser = new QemuStreamParser();
        int pos = 0;
        while (parser.TryRead(input.AsSpan(pos), true, out var seg))
            pos += seg.Length;
        Assert.Equal((opaque, postCopy), (parser.IsOpaque, parser.PostCopy));
    }

    /// <summary>
    /// A stream is armed for post-copy (the next memory connection of its QEMU can only be the
    /// preempt channel) from the first ram iteration after a POSTCOPY_ADVISE with its 16-byte
    /// body, through the switch; never with the empty ADVISE of dirty bitmaps alone, never during
    /// setup (multifd channels may still be connecting), and no longer once the stream ends in
    /// precopy.
    /// </summary>
    [Theory]
    [InlineData(QemuFormat.PostcopyAdviseRamLength, true, true)]
    [InlineData(QemuFormat.PostcopyAdviseRamLength, false, false)]
    [InlineData(0, true, false)]
    public void A_stream_is_armed_for_post_copy_from_its_first_iteration_after_a_ram_advise(ushort adviseLength, bool switches, bool armedAtTheEnd)
    {
        var b = new StreamBuilder().Header()
            .U8(QemuFormat.Command).Be16(QemuFormat.CmdPostcopyAdvise).Be16(adviseLength).Bytes(new byte[adviseLength])
            .RamStart(("pc.ram", 8 * 4096));
        var before = b.ToArray();
        var iteration = b.Part().Page(0, 1, Page1).Eos().Footer().ToArray()[before.Length..];
        if (switches)
            b.U8(QemuFormat.Command).Be16(QemuFormat.CmdPostcopyListen).Be16(0);
        else
            b.End().Eos().Footer().DeviceStateAndEof();
        var parser = new QemuStreamParser();
        var input = b.ToArray();
        var armedAt = new List<(long Position, bool Armed)>();
        int pos = 0;
        while (parser.TryRead(input.AsSpan(pos), true, out var seg))
        {
            pos += seg.Length;
            armedAt.Add((pos, parser.PostCopyArmed));
        }
        Assert.DoesNotContain(armedAt, a => a.Armed && a.Position <= before.Length);
        Assert.Equal(adviseLength == QemuFormat.PostcopyAdviseRamLength,
            armedAt.Last(a => a.Position == before.Length + iteration.Length).Armed);
        Assert.Equal(armedAtTheEnd, parser.PostCopyArmed);
        Assert.Equal(switches, parser.PostCopy);
    }

    [Fact]
    public void Real_qemu72_paused_stream_matches_what_qemu_reported()
    {
        // query-migrate at capture time said: normal 49 pages, duplicate (zero) 8273.
        var input = Fixtures.Load("q72-pc-paused.bin");
        var parser = new QemuStreamParser();
        int pos = 0, pages = 0, zeros = 0;
        while (parser.TryRead(input.AsSpan(pos), true, out var seg))
        {
            pos += seg.Length;
            if (seg.Kind == SegmentKind.Page) pages++;
            if (seg.Fact == PageFact.Zero) zeros++;
        }
        Assert.Equal(49, pages);
        Assert.Equal(8273, zeros);
        Assert.Equal(["pc.ram", "/rom@etc/acpi/tables", "pc.bios", "pc.rom", "/rom@etc/table-loader", "/rom@etc/acpi/rsdp"], parser.Blocks.Select(b => b.Name));
    }
}
