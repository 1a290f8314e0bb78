using BFMig.Transfer.Wire;

namespace BFMig.Transfer.Memory;

/// <summary>
/// The op stream inside <see cref="BFMig.Transfer.Wire.FrameType.MigData"/> frames: everything the
/// receiver needs to rebuild the exact QEMU stream from its retained store.
/// <list type="bullet">
/// <item><c>0x40 RAW be32 n, n bytes</c>: stream bytes as they are.</item>
/// <item><c>0x41 BLOCKS varint count, count x (u8 len, idstr, varint length)</c>: the MEM_SIZE block list; starts the store trip.</item>
/// <item><c>0x42 ELIDE_RUN varint n</c>: n PAGE records at the following pages (CONTINUE headers), content as retained.</item>
/// <item><c>0x43 ROUND</c> (only when <see cref="MigEncoder.CountRounds"/>): the stream passed a ram EOS; later records belong to the next sync round (<see cref="PageWrite"/>).</item>
/// <item><c>0x44 PAUSED</c> (once): the stream reached the ram section's END records, which QEMU sends only once it has paused the guest (<see cref="MigEncoder.SourcePaused"/>).</item>
/// <item><c>0x00-0x1F</c> page op: bits 0-2 kind, bit 3 SEQ (same block, next page; else <c>varint block, varint page</c>
/// follow), bit 4 CONT (the regenerated record header uses CONTINUE; else it names the block).</item>
/// </list>
/// Page kinds: ELIDE (content as retained), REF (<c>varint block, varint page, 16-byte hash</c>: copy of
/// another retained page), DELTA (<c>varint n, n bytes</c> of <see cref="PageDelta"/>), FULL (4096 bytes),
/// ZERO (regenerates a ZERO record with fill 0), FACT_UNKNOWN (no bytes: a raw record changed the page
/// to unknown content).
/// </summary>
public static class MigOps
{
    public const byte Raw = 0x40;
    public const byte Blocks = 0x41;
    public const byte ElideRun = 0x42;
    public const byte Round = 0x43;
    public const byte Paused = 0x44;

    public const byte KindElide = 0;
    public const byte KindRef = 1;
    public const byte KindDelta = 2;
    public const byte KindFull = 3;
    public const byte KindZero = 4;
    public const byte KindUnknown = 5;

    public const byte KindMask = 0x07;
    public const byte SeqBit = 0x08;
    public const byte ContBit = 0x10;
}
