using System.Buffers;
using BFMig.Transfer.Disk.Nbd;
using CsCheck;
using Xunit;

namespace BFMig.Transfer.Tests.Nbd;

public sealed class NbdCodecTests
{
    private static ReadOnlySequence<byte> Seq(byte[] bytes) => new(bytes);

    [Fact]
    public void CompactWriteHeaderMatchesTheSpecLayout()
    {
        byte[] bytes = Convert.FromHexString("25609513" + "0000" + "0001" + "0102030405060708" + "0000000000100000" + "00000004" + "DEADBEEF");
        var input = Seq(bytes);
        Assert.True(NbdRequest.TryRead(ref input, extended: false, 1 << 20, 0, out var r));
        Assert.Equal(NbdCommand.Write, r.Command);
        Assert.Equal(0x0102030405060708UL, r.Cookie);
        Assert.Equal(0x100000UL, r.Offset);
        Assert.Equal(4UL, r.Length);
        Assert.Equal(Convert.FromHexString("DEADBEEF"), r.Payload.ToArray());
        Assert.Equal(0, input.Length);
    }

    [Fact]
    public void ExtendedWriteZeroesCarriesA64BitLength()
    {
        byte[] bytes = Convert.FromHexString("21e41c71" + "0002" + "0006" + "00000000000000AA" + "0000000000000000" + "0000000200000000");
        var input = Seq(bytes);
        Assert.True(NbdRequest.TryRead(ref input, extended: true, 1 << 20, 0, out var r));
        Assert.Equal(NbdCommand.WriteZeroes, r.Command);
        Assert.Equal(NbdCommandFlags.NoHole, r.Flags);
        Assert.Equal(8UL << 30, r.Length);
        Assert.Equal(0, r.Payload.Length);
    }

    [Fact]
    public void RequestsRoundTripAndIncompleteInputConsumesNothing()
    {
        var gen = Gen.Select(Gen.Bool, Gen.Enum<NbdCommand>().Where(c => c != NbdCommand.Resize), Gen.ULong, Gen.ULong, Gen.Int[0, 300], Gen.Enum<NbdCommandFlags>());
        gen.Sample((extended, command, cookie, offset, length, flagBits) =>
        {
            var flags = flagBits & (NbdCommandFlags.Fua | NbdCommandFlags.NoHole | NbdCommandFlags.FastZero);
            int payload = command == NbdCommand.Write ? length : 0;
            var bytes = new byte[NbdRequest.HeaderLength(extended) + payload];
            int n = NbdRequest.WriteHeader(bytes, extended, flags, command, cookie, offset, (ulong)length);
            for (int i = 0; i < payload; i++)
                bytes[n + i] = (byte)i;
            for (int cut = 0; cut < bytes.Length; cut += Math.Max(1, bytes.Length / 7))
            {
                var partial = Seq(bytes[..cut]);
                Assert.False(NbdRequest.TryRead(ref partial, extended, 1 << 20, 0, out _));
                Assert.Equal(cut, partial.Length);
            }
            var input = Seq(bytes);
            Assert.True(NbdRequest.TryRead(ref input, extended, 1 << 20, 0, out var r));
            Assert.Equal((command, flags, cookie, offset, (ulong)length), (r.Command, r.Flags, r.Cookie, r.Offset, r.Length));
            Assert.Equal(bytes[n..], r.Payload.ToArray());
            Assert.Equal(0, input.Length);
        });
    }

    [Fact]
    public void ReplyHeadersRoundTrip()
    {
        var gen = Gen.Select(Gen.Int[0, 2], Gen.UShort, Gen.ULong, Gen.ULong, Gen.UInt[0, 1 << 20], Gen.UInt);
        gen.Sample((kind, type, cookie, offset, length, error) =>
        {
            var bytes = new byte[40];
            NbdHeaderStyle style;
            int n;
            if (kind == 0)
            {
                style = NbdHeaderStyle.Structured;
                n = NbdReplyHeader.WriteSimple(bytes, error, cookie);
            }
            else
            {
                style = kind == 1 ? NbdHeaderStyle.Structured : NbdHeaderStyle.Extended;
                n = NbdReplyHeader.WriteChunk(bytes, kind == 2, NbdReplyFlags.Done, (NbdReplyChunkType)type, cookie, offset, length);
            }
            for (int cut = 0; cut < n; cut++)
                Assert.False(NbdReplyHeader.TryPeek(Seq(bytes[..cut]), style, 1 << 20, 0, out _));
            Assert.True(NbdReplyHeader.TryPeek(Seq(bytes[..n]), style, 1 << 20, 0, out var h));
            Assert.Equal(n, h.HeaderLength);
            Assert.Equal(cookie, h.Cookie);
            if (kind == 0)
            {
                Assert.Equal(error, h.Error);
            }
            else
            {
                Assert.Equal((NbdReplyChunkType)type, h.ChunkType);
                Assert.Equal((ulong)length, h.PayloadLength);
                Assert.True(h.IsLast);
                if (kind == 2)
                    Assert.Equal(offset, h.Offset);
            }
        });
    }

    [Fact]
    public void OptionsAndOptionRepliesRoundTrip()
    {
        Gen.Select(Gen.Enum<NbdOption>(), Gen.Byte.Array[0, 64]).Sample((option, data) =>
        {
            var bytes = new byte[NbdHandshake.OptionHeaderLength + data.Length];
            NbdHandshake.WriteOptionHeader(bytes, option, data.Length);
            data.CopyTo(bytes, NbdHandshake.OptionHeaderLength);
            var partial = Seq(bytes[..^1]);
            Assert.False(NbdHandshake.TryReadOption(ref partial, 0, out _));
            var input = Seq(bytes);
            Assert.True(NbdHandshake.TryReadOption(ref input, 0, out var o));
            Assert.Equal(option, o.Option);
            Assert.Equal(data, o.Data.ToArray());

            var reply = new byte[NbdHandshake.OptionReplyHeaderLength + data.Length];
            NbdHandshake.WriteOptionReplyHeader(reply, option, NbdOptionReplyType.Info, data.Length);
            data.CopyTo(reply, NbdHandshake.OptionReplyHeaderLength);
            var r = Seq(reply);
            Assert.True(NbdHandshake.TryReadOptionReply(ref r, 0, out var or));
            Assert.Equal((option, NbdOptionReplyType.Info), (or.Option, or.Type));
            Assert.Equal(data, or.Data.ToArray());
            Assert.False(or.IsFinal);
        });
    }

    [Fact]
    public void CompletionRepliesUseTheFormTheStyleRequires()
    {
        var buffer = new byte[40];
        Assert.Equal(16, NbdReplyHeader.WriteCompletion(buffer, NbdHeaderStyle.Compact, 7, 0, 5));
        Assert.Equal(16, NbdReplyHeader.WriteCompletion(buffer, NbdHeaderStyle.Structured, 7, 0, 0));
        int n = NbdReplyHeader.WriteCompletion(buffer, NbdHeaderStyle.Structured, 7, 0, 5);
        Assert.Equal(26, n);
        Assert.True(NbdReplyHeader.TryPeek(Seq(buffer[..n]), NbdHeaderStyle.Structured, 100, 0, out var h));
        Assert.True(h.IsErrorChunk);
        Assert.Equal(5u, NbdReplyHeader.ParseChunkError(Seq(buffer[20..n]), 20));
        n = NbdReplyHeader.WriteCompletion(buffer, NbdHeaderStyle.Extended, 9, 4096, 0);
        Assert.Equal(32, n);
        Assert.True(NbdReplyHeader.TryPeek(Seq(buffer[..n]), NbdHeaderStyle.Extended, 100, 0, out h));
        Assert.Equal((NbdReplyKind.Extended, 9UL, 4096UL, true), (h.Kind, h.Cookie, h.Offset, h.IsLast));
    }

    [Theory]
    [InlineData("00000000000000000000000000000000000000000000000000000000", false, "request magic 0x00000000", 1000)]
    [InlineData("21e41c71000000010000000000000001000000000000000000000000", false, "does not match the negotiated header style", 1000)]
    [InlineData("256095130000000100000000000000010000000000000000FFFFFFFF", false, "payload length 4294967295 exceeds", 1024)]
    [InlineData("2560951300000042000000000000000100000000000000000000000000000000", false, "unknown command type 66", 1006)]
    [InlineData("2560951380000001000000000000000100000000000000000000000000000000", false, "unknown command flags 0x8000", 1004)]
    public void MalformedRequestsNameWhatAndWhere(string hex, bool extended, string expected, long expectedOffset)
    {
        var input = Seq(Convert.FromHexString(hex));
        var e = Assert.Throws<NbdProtocolException>(() => NbdRequest.TryRead(ref input, extended, 32 << 20, 1000, out _));
        Assert.Contains(expected, e.Message, StringComparison.Ordinal);
        Assert.Contains($"at byte {expectedOffset}", e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void MalformedRepliesNameWhatAndWhere()
    {
        var buffer = new byte[40];
        NbdReplyHeader.WriteSimple(buffer, 0, 1);
        var e = Assert.Throws<NbdProtocolException>(() => NbdReplyHeader.TryPeek(Seq(buffer[..16]), NbdHeaderStyle.Extended, 100, 50, out _));
        Assert.Contains("simple reply after extended headers", e.Message, StringComparison.Ordinal);
        int n = NbdReplyHeader.WriteChunk(buffer, false, 0, NbdReplyChunkType.OffsetData, 1, 0, 1_000_000);
        e = Assert.Throws<NbdProtocolException>(() => NbdReplyHeader.TryPeek(Seq(buffer[..n]), NbdHeaderStyle.Structured, 65536, 0, out _));
        Assert.Contains("chunk payload length 1000000 exceeds", e.Message, StringComparison.Ordinal);
        e = Assert.Throws<NbdProtocolException>(() => NbdReplyHeader.TryPeek(Seq(new byte[] { 1, 2, 3, 4 }), NbdHeaderStyle.Structured, 100, 77, out _));
        Assert.Contains("at byte 77: reply magic 0x01020304", e.Message, StringComparison.Ordinal);
        var greeting = Seq(Convert.FromHexString("4e42444d41474943" + "0000000000000000" + "0001"));
        e = Assert.Throws<NbdProtocolException>(() => NbdHandshake.TryReadGreeting(ref greeting, 0, out _));
        Assert.Contains("is not IHAVEOPT", e.Message, StringComparison.Ordinal);
        var option = Seq(Convert.FromHexString("49484156454F5054" + "00000007" + "7FFFFFFF"));
        e = Assert.Throws<NbdProtocolException>(() => NbdHandshake.TryReadOption(ref option, 0, out _));
        Assert.Contains("data length 2147483647 exceeds", e.Message, StringComparison.Ordinal);
    }
}
