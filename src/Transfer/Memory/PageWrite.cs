namespace BFMig.Transfer.Memory;

/// <summary>
/// Who records a page in a trip, and in which sync round: the main stream (<see cref="MainWriter"/>)
/// or multifd channel <c>id</c> (<see cref="ChannelWriter"/>). The main stream and the channels of
/// a trip reach the two hosts' helpers in different interleavings, so the store orders their
/// writes by round, not by arrival (<see cref="TripWrites"/>). A round is the number of sync points
/// passed plus one: QEMU sends a page at most once between two sync points (the channels' SYNC
/// packets, the main stream's ram EOS), so a later round's copy is the newer one.
/// </summary>
/// <param name="Round">Sync round, from 1 (0: the main stream of a test that does not count rounds).</param>
/// <param name="Writer">Writer id: <see cref="MainWriter"/> or <see cref="ChannelWriter"/>.</param>
public readonly record struct PageWrite(long Round, int Writer)
{
    /// <summary>Writer id of the main stream.</summary>
    public const int MainWriter = 1;

    /// <summary>Writer id of multifd channel <paramref name="channel"/>.</summary>
    public static int ChannelWriter(byte channel) => 2 + channel;

    /// <summary>A write of the main stream in <paramref name="round"/>.</summary>
    public static PageWrite Main(long round) => new(round, MainWriter);

    /// <summary>A write of multifd channel <paramref name="channel"/> in <paramref name="round"/>.</summary>
    public static PageWrite Channel(byte channel, long round) => new(round, ChannelWriter(channel));
}
