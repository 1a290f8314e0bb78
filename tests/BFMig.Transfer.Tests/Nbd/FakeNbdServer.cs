using System.Buffers.Binary;
using System.Buffers;
using System.Net.Sockets;
using BFMig.Transfer.Disk.Nbd;
using Xunit;

namespace BFMig.Transfer.Tests.Nbd;

/// <summary>Two connected unix stream sockets (the in-memory wiring of the fake tests).</summary>
internal static class SocketPair
{
    public static async Task<(NetworkStream A, NetworkStream B)> CreateAsync()
    {
        string path = Path.Combine("/tmp", "bfnbd-sp-" + Guid.NewGuid().ToString("N")[..10] + ".sock");
        using var listener = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        listener.Bind(new UnixDomainSocketEndPoint(path));
        listener.Listen(1);
        var a = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        var accept = listener.AcceptAsync();
        await a.ConnectAsync(new UnixDomainSocketEndPoint(path));
        var b = await accept;
        File.Delete(path);
        return (new NetworkStream(a, ownsSocket: true), new NetworkStream(b, ownsSocket: true));
    }
}

/// <summary>
/// An in-memory NBD server (fixed newstyle; compact, structured or extended headers) for tests
/// that need exact control: it answers in reverse order whenever its input runs dry (so replies
/// come out of order), checks that FLUSH arrives with no write unanswered, and can be told to
/// misbehave.
/// </summary>
internal sealed class FakeNbdServer
{
    private readonly byte[] _disk;
    private readonly List<(ulong Cookie, byte[] Bytes)> _queued = [];

    public FakeNbdServer(byte[] disk, bool structured = true, bool extended = false)
    {
        _disk = disk;
        Structured = structured;
        Extended = extended;
    }

    public bool Structured { get; }

    public bool Extended { get; }

    public NbdHeaderStyle Style { get; private set; }

    public byte[] Disk => _disk;

    public List<(NbdCommand Command, ulong Offset, ulong Length, NbdCommandFlags Flags)> Requests { get; } = [];

    public List<string> Violations { get; } = [];

    /// <summary>When set, the reply to the n-th request carries a cookie nobody sent.</summary>
    public int? BogusCookieAtRequest { get; init; }

    /// <summary>When set, WRITEs touching this offset fail with EIO.</summary>
    public ulong? FailWritesAt { get; init; }

    /// <summary>When set, the server answers this many requests, then closes the connection (its QEMU went away).</summary>
    public int? CloseAfterRequests { get; init; }

    public async Task RunAsync(Stream stream, CancellationToken ct)
    {
        using var input = new NbdInput(stream, "fake-client", 64 << 20);
        var greeting = new byte[NbdHandshake.GreetingLength];
        NbdHandshake.WriteGreeting(greeting, NbdHandshakeFlags.FixedNewstyle | NbdHandshakeFlags.NoZeroes);
        await stream.WriteAsync(greeting, ct);
        if (!await input.EnsureAsync(4, ct))
            return;
        input.Consume(4);
        while (true)
        {
            var buffered = input.Buffered;
            if (!NbdHandshake.TryReadOption(ref buffered, input.Position, out var option))
            {
                if (!await input.FillAsync(ct))
                    return;
                continue;
            }
            var opt = option.Option;
            input.ConsumeTo(buffered);
            switch (opt)
            {
                case NbdOption.ExtendedHeaders when Extended:
                    Style = NbdHeaderStyle.Extended;
                    await OptionReplyAsync(stream, opt, NbdOptionReplyType.Ack, [], ct);
                    break;
                case NbdOption.StructuredReply when Structured:
                    if (Style == NbdHeaderStyle.Compact)
                        Style = NbdHeaderStyle.Structured;
                    await OptionReplyAsync(stream, opt, NbdOptionReplyType.Ack, [], ct);
                    break;
                case NbdOption.Go:
                case NbdOption.Info:
                    var info = new byte[12];
                    BinaryPrimitives.WriteUInt16BigEndian(info, (ushort)NbdInfoType.Export);
                    BinaryPrimitives.WriteUInt64BigEndian(info.AsSpan(2), (ulong)_disk.Length);
                    BinaryPrimitives.WriteUInt16BigEndian(info.AsSpan(10), (ushort)(NbdTransmissionFlags.HasFlags | NbdTransmissionFlags.SendFlush
                        | NbdTransmissionFlags.SendFua | NbdTransmissionFlags.SendTrim | NbdTransmissionFlags.SendWriteZeroes));
                    await OptionReplyAsync(stream, opt, NbdOptionReplyType.Info, info, ct);
                    await OptionReplyAsync(stream, opt, NbdOptionReplyType.Ack, [], ct);
                    if (opt == NbdOption.Go)
                    {
                        await TransmissionAsync(stream, input, ct);
                        return;
                    }
                    break;
                default:
                    await OptionReplyAsync(stream, opt, NbdOptionReplyType.ErrorUnsupported, [], ct);
                    break;
            }
        }
    }

    private static async Task OptionReplyAsync(Stream stream, NbdOption option, NbdOptionReplyType type, byte[] data, CancellationToken ct)
    {
        var header = new byte[NbdHandshake.OptionReplyHeaderLength];
        NbdHandshake.WriteOptionReplyHeader(header, option, type, data.Length);
        await stream.WriteAsync(header, ct);
        await stream.WriteAsync(data, ct);
    }

    private async Task TransmissionAsync(Stream stream, NbdInput input, CancellationToken ct)
    {
        bool extended = Style == NbdHeaderStyle.Extended;
        while (true)
        {
            var buffered = input.Buffered;
            if (!NbdRequest.TryRead(ref buffered, extended, 32 << 20, input.Position, out var request))
            {
                await FlushRepliesAsync(stream, ct);
                if (!await input.FillAsync(ct))
                    return;
                continue;
            }
            if (Requests.Count == CloseAfterRequests)
            {
                await FlushRepliesAsync(stream, ct);
                stream.Close();
                return;
            }
            Requests.Add((request.Command, request.Offset, request.Length, request.Flags));
            uint error = 0;
            byte[]? readData = null;
            switch (request.Command)
            {
                case NbdCommand.Write:
                    if (FailWritesAt is { } bad && bad >= request.Offset && bad < request.Offset + request.Length)
                        error = NbdError.IO;
                    else
                        request.Payload.CopyTo(_disk.AsSpan((int)request.Offset));
                    break;
                case NbdCommand.WriteZeroes:
                case NbdCommand.Trim:
                    _disk.AsSpan((int)request.Offset, (int)request.Length).Clear();
                    break;
                case NbdCommand.Read:
                    readData = _disk.AsSpan((int)request.Offset, (int)request.Length).ToArray();
                    break;
                case NbdCommand.Flush:
                    if (_queued.Count > 0)
                        Violations.Add($"FLUSH arrived with {_queued.Count} earlier request(s) unanswered");
                    break;
                case NbdCommand.Disconnect:
                    input.ConsumeTo(buffered);
                    await FlushRepliesAsync(stream, ct);
                    stream.Close();
                    return;
            }
            ulong cookie = request.Cookie;
            if (BogusCookieAtRequest == Requests.Count)
                cookie ^= 0xdead0000beef;
            _queued.Add((request.Cookie, EncodeReply(cookie, request.Offset, error, readData)));
            input.ConsumeTo(buffered);
        }
    }

    private byte[] EncodeReply(ulong cookie, ulong offset, uint error, byte[]? readData)
    {
        var buffer = new ArrayBufferWriter<byte>();
        var header = new byte[40];
        if (readData is null || error != 0)
        {
            int n = NbdReplyHeader.WriteCompletion(header, Style, cookie, offset, error);
            buffer.Write(header.AsSpan(0, n));
            return buffer.WrittenSpan.ToArray();
        }
        if (Style == NbdHeaderStyle.Compact)
        {
            buffer.Write(header.AsSpan(0, NbdReplyHeader.WriteSimple(header, 0, cookie)));
            buffer.Write(readData);
            return buffer.WrittenSpan.ToArray();
        }
        bool extended = Style == NbdHeaderStyle.Extended;
        int h = NbdReplyHeader.WriteChunk(header, extended, NbdReplyFlags.Done, NbdReplyChunkType.OffsetData, cookie, offset, (ulong)readData.Length + 8);
        buffer.Write(header.AsSpan(0, h));
        var off = new byte[8];
        BinaryPrimitives.WriteUInt64BigEndian(off, offset);
        buffer.Write(off);
        buffer.Write(readData);
        return buffer.WrittenSpan.ToArray();
    }

    private async Task FlushRepliesAsync(Stream stream, CancellationToken ct)
    {
        for (int i = _queued.Count - 1; i >= 0; i--)
            await stream.WriteAsync(_queued[i].Bytes, ct);
        _queued.Clear();
        await stream.FlushAsync(ct);
    }
}
