using BFMig.Transfer;
using BFMig.Transfer.Memory;
using BFMig.Transfer.Wire;

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

    private const int OpsPages = 16;
    private static MemoryStore? _opsStore;
    private static readonly string OpsRoot = Path.Combine(Directory.Exists("/dev/shm") ? "/dev/shm" : Path.GetTempPath(), "bfmig-fuzz-multifd-" + Environment.ProcessId);

    /// <summary>Frames of <see cref="MultifdEncoder"/> ops: the channels above sent in full, and one eliding against the fuzz store.</summary>
    public static List<byte[]> OpsCorpus()
    {
        var list = new List<byte[]>();
        foreach (var channel in Corpus())
        {
            var enc = new MultifdEncoder(null, synced: false, new TransferStats());
            enc.Consume(channel, isFinal: true);
            list.Add(enc.Ops.ToArray());
        }
        byte[] head = [.. new MultifdInit(0, Guid.Empty).Encode(), .. new MultifdPacket(0, 1, "pc.ram", [0x1000, 0x2000, 0x3000], []).EncodeHeader()];
        list.Add([MigOps.Raw, 0, 0, (byte)(head.Length >> 8), (byte)head.Length, .. head, MigOps.KindElide, MigOps.KindRef, 0, 5, .. new byte[16], MigOps.KindElide]);
        return list;
    }

    /// <summary>
    /// A hostile sender's multifd ops into <see cref="MultifdDecoder"/>, in a trip on a store that
    /// holds pages: anything but a protocol error or a store-out-of-step error is a bug, output
    /// stays bounded, and the store's index matches its pages afterwards.
    /// </summary>
    public static void RunOps(byte[] input, Random r)
    {
        var store = _opsStore ??= OpenOpsStore();
        store.BeginTrip([new RamBlockInfo("pc.ram", OpsPages * 4096L)], store.State.Seed, keep: true, buildLocator: false);
        var dec = new MultifdDecoder(store, new TransferStats());
        try
        {
            dec.BeginFrame();
            int pos = 0;
            do
            {
                pos = dec.Process(input, pos);
                if (dec.Output.Length > MigDecoder.OutputThreshold + FrameCodec.MaxPayload + 4096) throw new InvalidOperationException($"output of {dec.Output.Length} bytes");
                dec.ResetOutput();
            }
            while (pos < input.Length);
            dec.Finish();
        }
        catch (Exception e) when (e is PeerProtocolException or StoreOutOfStepException)
        {
        }
        store.Commit(1, "fuzz", snapshotComplete: false);
        for (long p = 0; p < OpsPages; p++)
        {
            var h = store.GetHash(0, p);
            if (h != UInt128.Zero && store.Hash(store.Page(0, p)) != h) throw new InvalidOperationException($"store index wrong for page {p}");
        }
    }

    private static MemoryStore OpenOpsStore()
    {
        if (Directory.Exists(OpsRoot)) Directory.Delete(OpsRoot, recursive: true);
        AppDomain.CurrentDomain.ProcessExit += (_, _) => { try { Directory.Delete(OpsRoot, recursive: true); } catch (IOException) { } };
        var store = MemoryStore.Open(OpsRoot, Guid.NewGuid());
        store.BeginTrip([new RamBlockInfo("pc.ram", OpsPages * 4096L)], store.State.Seed, keep: false, buildLocator: false);
        for (int p = 0; p < OpsPages; p++)
        {
            var page = Enumerable.Range(0, 4096).Select(i => (byte)(i * p + 1)).ToArray();
            store.Put(0, p, page, store.Hash(page));
        }
        store.Commit(1, "fuzz", snapshotComplete: false);
        return store;
    }
}
