using System.Buffers.Binary;
using System.Buffers;
using BFMig.Native.Compression;
using BFMig.Transfer.Disk.Nbd;
using BFMig.Transfer.Disk;

namespace BFMig.Fuzz;

/// <summary>
/// The NBD codec as both hosts use it: the receiver's tap (<see cref="NbdStreamObserver"/>) fed a
/// whole conversation, and the sender's filter (<see cref="NbdSenderFilter"/>) between a client and
/// a server that have said everything in advance. Input: the trace format of
/// tests/BFMig.Transfer.Tests/Fixtures/Nbd (records of u8 direction, be32 length, bytes; a length
/// past the end is cut). Allowed failure: <see cref="NbdProtocolException"/>. A filter that is
/// still running after <see cref="Deadline"/> with both streams at their end is a hang.
/// </summary>
internal static class NbdTarget
{
    /// <summary>The traced image: 2 MiB (NbdTraceFixtureTests.TraceImageContent).</summary>
    private const ulong ImageSize = 2UL << 20;

    // 4 KiB blocks (not the default 64 KiB), so that seeds small enough for afl still hold whole blocks.
    private const int BlockSize = 4096;

    private static readonly TimeSpan Deadline = TimeSpan.FromSeconds(5);

    public static List<byte[]> Corpus()
    {
        var list = new List<byte[]>();
        using var zstd = new ZstdCodec();
        var buffer = new byte[8 << 20];
        foreach (var f in Directory.GetFiles(Path.Combine(AppContext.BaseDirectory, "Fixtures", "Nbd"), "*.trace.zst").Order())
        {
            byte[] trace = buffer[..zstd.Decompress(File.ReadAllBytes(f), buffer)];
            list.Add(trace);
            list.Add(Condensed(trace));
        }
        return list;
    }

    /// <summary>
    /// Largest export the harness lets the server declare. Up to DiskBlockMap.MaxBlockCount blocks
    /// are accepted by design (17 bytes a block: 4 GiB and more for 2^28 blocks), which made single
    /// inputs take seconds and gigabytes; a real bound (the source disk's size) is an open finding.
    /// </summary>
    private const ulong MaxDeclaredExport = 1UL << 30;

    public static void Run(byte[] input, Random r)
    {
        var (records, client, server) = Split(input);
        if (DeclaredExportSizes(server).Exists(size => size > MaxDeclaredExport))
            return;
        // Maps cost 17 bytes a block of the export size the server declares (up to DiskBlockMap.MaxBlockCount): that is the documented bound.
        var budget = Budget.Start(64 << 20, "nbd");

        var observer = new NbdStreamObserver(Retained());
        try
        {
            foreach (var (fromClient, bytes) in records)
            {
                if (fromClient)
                    observer.OnClientBytes(bytes);
                else
                    observer.OnServerBytes(bytes);
            }
        }
        catch (NbdProtocolException)
        {
        }
        observer.Report(new DiskBlockMap(ImageSize, BlockSize));
        budget.Check(3 * 17 * DiskBlockHash.CountBlocks(observer.ExportSize, BlockSize));

        var filter = new NbdSenderFilter(new NbdSenderFilterOptions { DrainTimeout = TimeSpan.FromMilliseconds(50) });
        var recorded = new DiskBlockMap(ImageSize, BlockSize);
        var run = Task.Run(() => filter.RunAsync(new ScriptedStream(client), new ScriptedStream(server), Retained(), recorded, CancellationToken.None));
        try
        {
            if (!run.Wait(Deadline))
                throw new TimeoutException($"the NBD filter still runs {Deadline.TotalSeconds} s after both streams ended");
        }
        catch (AggregateException e) when (e.InnerException is NbdProtocolException)
        {
        }
        budget.Check(3 * 17 * (DiskBlockHash.CountBlocks(observer.ExportSize, BlockSize) + DiskBlockHash.CountBlocks(recorded.ImageSize, BlockSize)));
    }

    // Every export size the server's handshake declares: in NBD_INFO_EXPORT replies, or where a
    // message is not an option reply, read as the EXPORT_NAME answer (size first) as the tap would.
    private static List<ulong> DeclaredExportSizes(byte[] server)
    {
        var sizes = new List<ulong>();
        var s = new ReadOnlySequence<byte>(server);
        try
        {
            if (!NbdHandshake.TryReadGreeting(ref s, 0, out _))
                return sizes;
            while (s.Length >= 8)
            {
                if (BinaryPrimitives.ReadUInt64BigEndian(s.Slice(0, 8).ToArray()) != NbdMagic.OptionReply)
                {
                    sizes.Add(BinaryPrimitives.ReadUInt64BigEndian(s.Slice(0, 8).ToArray()));
                    break;
                }
                if (!NbdHandshake.TryReadOptionReply(ref s, 0, out var reply))
                    break;
                if (reply.Type == NbdOptionReplyType.Info && reply.Data.Length == 12 && NbdHandshake.TryParseExportInfo(reply.Data, 0, out ulong size, out _))
                    sizes.Add(size);
            }
        }
        catch (NbdProtocolException)
        {
        }
        return sizes;
    }

    private static DiskBlockMap Retained()
    {
        // The target already holds block 0 of the condensed seeds' content: their first WRITE is elided.
        var map = new DiskBlockMap(ImageSize, BlockSize);
        map.Set(0, DiskBlockHash.Compute(Block(0), map.HashKey));
        return map;
    }

    private static byte[] Block(int b)
    {
        var block = new byte[BlockSize];
        block.AsSpan().Fill((byte)(b * 7 + 1));
        return block;
    }

    private static (List<(bool FromClient, byte[] Bytes)> Records, byte[] Client, byte[] Server) Split(byte[] input)
    {
        var records = new List<(bool, byte[])>();
        var client = new List<byte>();
        var server = new List<byte>();
        for (int at = 0; at + 5 <= input.Length;)
        {
            bool fromClient = input[at] == 0;
            int length = (int)Math.Min(BinaryPrimitives.ReadUInt32BigEndian(input.AsSpan(at + 1)), (uint)(input.Length - at - 5));
            var bytes = input.AsSpan(at + 5, length).ToArray();
            records.Add((fromClient, bytes));
            (fromClient ? client : server).AddRange(bytes);
            at += 5 + length;
        }
        return (records, [.. client], [.. server]);
    }

    /// <summary>
    /// A real trace's handshake (options and replies as QEMU and its server exchanged them) with a
    /// short transmission in its header style: a WRITE that the target already holds, a partial
    /// WRITE, WRITE_ZEROES, TRIM, FLUSH, then DISC, each answered. Small enough for afl.
    /// </summary>
    private static byte[] Condensed(byte[] trace)
    {
        var (_, client, server) = Split(trace);
        var c = new ReadOnlySequence<byte>(client);
        NbdHandshake.TryReadClientFlags(ref c, 0, out _);
        var options = new List<NbdOption>();
        while (NbdHandshake.TryReadOption(ref c, 0, out var option))
        {
            options.Add(option.Option);
            if (option.Option == NbdOption.Go)
                break;
        }
        var s = new ReadOnlySequence<byte>(server);
        NbdHandshake.TryReadGreeting(ref s, 0, out _);
        var style = NbdHeaderStyle.Compact;
        foreach (var asked in options)
        {
            NbdOptionReply reply;
            do
            {
                NbdHandshake.TryReadOptionReply(ref s, 0, out reply);
            }
            while (!reply.IsFinal);
            if (reply.Type == NbdOptionReplyType.Ack && asked == NbdOption.StructuredReply)
                style = NbdHeaderStyle.Structured;
            if (reply.Type == NbdOptionReplyType.Ack && asked == NbdOption.ExtendedHeaders)
                style = NbdHeaderStyle.Extended;
        }
        bool extended = style == NbdHeaderStyle.Extended;
        var requests = new MemoryStream();
        var replies = new MemoryStream();
        var header = new byte[64];
        ulong cookie = 1;
        void Request(NbdCommand command, ulong offset, ulong length, byte[]? payload)
        {
            int n = NbdRequest.WriteHeader(header, extended, 0, command, cookie, offset, length);
            requests.Write(header, 0, n);
            if (payload is not null)
                requests.Write(payload);
            if (command != NbdCommand.Disconnect)
                replies.Write(header, 0, NbdReplyHeader.WriteCompletion(header, style, cookie, offset, 0));
            cookie++;
        }
        Request(NbdCommand.Write, 0, BlockSize, Block(0));
        Request(NbdCommand.Write, 5 * BlockSize + 512, 1024, Block(5)[..1024]);
        Request(NbdCommand.Write, 6 * BlockSize, BlockSize, Block(6));
        Request(NbdCommand.WriteZeroes, 8 * BlockSize, 4 * BlockSize, null);
        Request(NbdCommand.Trim, 16 * BlockSize, BlockSize, null);
        Request(NbdCommand.Flush, 0, 0, null);
        Request(NbdCommand.Disconnect, 0, 0, null);

        var output = new MemoryStream();
        void Record(bool fromClient, ReadOnlySpan<byte> bytes)
        {
            output.WriteByte(fromClient ? (byte)0 : (byte)1);
            Span<byte> length = stackalloc byte[4];
            BinaryPrimitives.WriteInt32BigEndian(length, bytes.Length);
            output.Write(length);
            output.Write(bytes);
        }
        // The tap sees each option before its reply, as a proxy forwards them.
        Record(true, client.AsSpan(0, (int)(client.Length - c.Length)));
        Record(false, server.AsSpan(0, (int)(server.Length - s.Length)));
        Record(true, requests.ToArray());
        Record(false, replies.ToArray());
        return output.ToArray();
    }
}
