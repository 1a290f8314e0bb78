using System.Buffers.Binary;
using System.Text;

namespace BFMig.Transfer.Memory;

/// <summary>
/// Incremental parser of the QEMU migration main channel. It recognises the header, the
/// configuration section, section framing and the <c>ram</c> section's records, and cuts the
/// stream into <see cref="QemuSegment"/>s. It never fails: anything it does not understand (an
/// unknown section, a non-ram iterative section, odd MEM_SIZE extras, a multifd channel, postcopy
/// commands) switches it to opaque mode, where the rest is returned as raw bytes. Memory is
/// bounded: no segment is longer than <see cref="MaxRecordLength"/> except opaque raw bytes, which
/// are returned as they come.
/// </summary>
public sealed partial class QemuStreamParser
{
    /// <summary>The most input one call may need to see before it can produce a segment.</summary>
    public const int MaxRecordLength = 8 + 1 + 255 + 4 + 8192;

    private const int MaxBlocks = 4096;
    private const int MaxConfigNameLength = 256;

    private enum State { Header, SectionTop, ConfigSubsections, RamRecords, MemSizeBlocks, BitmapChunks, Opaque }

    private readonly List<RamBlockInfo> _blocks = [];
    private State _state = State.Header;
    private uint _ramSectionId = uint.MaxValue;
    private uint _bitmapSectionId = uint.MaxValue;
    private bool _ramInEndSection;
    private int _lastBlock = -1;
    private long _memSizeRemaining;
    private bool _blocksDefinedPending;
    private bool _opaqueMarked;
    private long _position;
    private bool _postCopyRamAdvised;
    private bool _ramIterating;

    /// <summary>RAMBlocks announced by MEM_SIZE, in stream order.</summary>
    public IReadOnlyList<RamBlockInfo> Blocks => _blocks;

    /// <summary>True once the parser gave up understanding the stream and carries the rest as raw bytes.</summary>
    public bool IsOpaque => _state == State.Opaque;

    /// <summary>Why the parser went opaque (null while it still understands the stream).</summary>
    public string? OpaqueReason { get; private set; }

    /// <summary>
    /// The stream went opaque at a post-copy command: the source QEMU is switching the guest to
    /// the destination, and from then on only QEMU may end the stream (a stream cut now leaves
    /// the guest's memory split between the hosts, paused until someone recovers it).
    /// </summary>
    public bool PostCopy { get; private set; }

    /// <summary>
    /// The only new connection the source QEMU may open for this migration now is its post-copy
    /// preempt channel: it advised post-copy RAM (POSTCOPY_ADVISE with its 16-byte body; bitmaps
    /// alone send none) and is past its setup (a ram iteration began), so its multifd channels
    /// (refused with post-copy before QEMU 10.1 anyway) have all connected and written their
    /// first packet (ram setup syncs them); and the stream has not ended in precopy (device
    /// state). QEMU connects the preempt channel at the switch and writes nothing on it until the
    /// destination faults. (A new migration may follow once this stream is closed: its helper
    /// stops reporting the stream armed then.)
    /// </summary>
    public bool PostCopyArmed => _postCopyRamAdvised && _ramIterating && (_state != State.Opaque || PostCopy);

    /// <summary>True when the ram section's END records were all parsed: every page QEMU sent on this channel was seen.</summary>
    public bool RamComplete { get; private set; }

    /// <summary>
    /// The ram section's sync round: 1 + the ram EOS records seen. QEMU 7.2 writes one after every
    /// iteration, once each multifd channel has sent that iteration's SYNC packet, so the main
    /// stream's round n and a channel's round n hold the same iteration (<see cref="PageWrite"/>).
    /// </summary>
    public long RamRound { get; private set; } = 1;

    /// <summary>
    /// True once the ram section's END began: QEMU writes it only on completing a precopy
    /// migration, after it paused the guest, so every byte from here on is waited for by a paused guest.
    /// </summary>
    public bool InRamEnd => _ramInEndSection;

    /// <summary>Stream offset of the next byte this parser will look at.</summary>
    public long Position => _position;

    /// <summary>
    /// Produces the next segment from <paramref name="input"/> (which starts at <see cref="Position"/>).
    /// Returns false and consumes nothing when the input holds no complete segment yet; when
    /// <paramref name="isFinal"/> is set, a trailing incomplete record is returned as raw bytes.
    /// When it stops understanding the stream it first returns one
    /// <see cref="SegmentKind.OpaqueFromHere"/> marker, then the rest as raw bytes.
    /// </summary>
    public bool TryRead(ReadOnlySpan<byte> input, bool isFinal, out QemuSegment segment)
    {
        if (_blocksDefinedPending)
        {
            _blocksDefinedPending = false;
            segment = new QemuSegment(SegmentKind.BlocksDefined, 0);
            return true;
        }
        if (_state != State.Opaque && TryParse(input, out segment))
        {
            _position += segment.Length;
            return true;
        }
        if (_state != State.Opaque && isFinal && input.Length > 0)
            GoOpaque($"stream ended inside a record at offset {_position}");
        if (_state == State.Opaque && !_opaqueMarked)
        {
            // Before any opaque byte: the memory sender sends End here, ahead of the device state.
            _opaqueMarked = true;
            segment = new QemuSegment(SegmentKind.OpaqueFromHere, 0);
            return true;
        }
        if (_state == State.Opaque && input.Length > 0)
        {
            segment = new QemuSegment(SegmentKind.Raw, input.Length);
            _position += input.Length;
            return true;
        }
        segment = default;
        return false;
    }

    private void GoOpaque(string reason)
    {
        _state = State.Opaque;
        OpaqueReason ??= reason;
    }

    private static QemuSegment Raw(int length) => new(SegmentKind.Raw, length);

    // Returns false either for "need more input" or after switching to opaque (the caller tells them apart by _state).
    private bool TryParse(ReadOnlySpan<byte> input, out QemuSegment segment)
    {
        segment = default;
        switch (_state)
        {
            case State.Header:
                if (input.Length < 8) return false;
                uint magic = BinaryPrimitives.ReadUInt32BigEndian(input);
                uint version = BinaryPrimitives.ReadUInt32BigEndian(input[4..]);
                if (magic != QemuFormat.FileMagic)
                {
                    GoOpaque(magic == QemuFormat.MultifdMagic ? "multifd channel" : $"not a QEMU migration stream (magic 0x{magic:x8})");
                    return false;
                }
                if (version != QemuFormat.FileVersion)
                {
                    GoOpaque($"unsupported stream version {version}");
                    return false;
                }
                _state = State.SectionTop;
                segment = Raw(8);
                return true;
            case State.SectionTop:
            case State.ConfigSubsections:
                return TryParseSection(input, out segment);
            case State.RamRecords:
                return TryParseRamRecord(input, out segment);
            case State.MemSizeBlocks:
                return TryParseMemSizeBlock(input, out segment);
            case State.BitmapChunks:
                return TryParseBitmapChunk(input, out segment);
            default:
                return false;
        }
    }

    private bool TryParseSection(ReadOnlySpan<byte> input, out QemuSegment segment)
    {
        segment = default;
        if (input.Length < 1) return false;
        byte type = input[0];
        if (_state == State.ConfigSubsections && type != QemuFormat.Subsection)
            _state = State.SectionTop;
        switch (type)
        {
            case QemuFormat.Configuration:
            {
                if (input.Length < 5) return false;
                uint len = BinaryPrimitives.ReadUInt32BigEndian(input[1..]);
                if (len > MaxConfigNameLength)
                {
                    GoOpaque($"configuration name of {len} bytes at offset {_position}");
                    return false;
                }
                if (input.Length < 5 + (int)len) return false;
                _state = State.ConfigSubsections;
                segment = Raw(5 + (int)len);
                return true;
            }
            case QemuFormat.Subsection when _state == State.ConfigSubsections:
                return TryParseConfigSubsection(input, out segment);
            case QemuFormat.SectionStart:
            case QemuFormat.SectionFull:
            {
                if (input.Length < 6) return false;
                int idLen = input[5];
                if (input.Length < 6 + idLen + 8) return false;
                uint sectionId = BinaryPrimitives.ReadUInt32BigEndian(input[1..]);
                var idstr = input.Slice(6, idLen);
                if (type == QemuFormat.SectionFull)
                {
                    // Device state is not length-prefixed; in precopy no RAM follows it, so carry the rest as it is.
                    GoOpaque(RamComplete ? "device state" : $"device state section before ram completed at offset {_position}");
                    return false;
                }
                if (idstr.SequenceEqual("dirty-bitmap"u8) && _bitmapSectionId == uint.MaxValue)
                {
                    // Persistent bitmaps (libvirt checkpoints) migrate in their own iterative section,
                    // right after ram's setup: carry it as it is and keep parsing the pages that follow.
                    _bitmapSectionId = sectionId;
                    _state = State.BitmapChunks;
                    segment = Raw(6 + idLen + 8);
                    return true;
                }
                if (!idstr.SequenceEqual("ram"u8) || _ramSectionId != uint.MaxValue)
                {
                    GoOpaque($"iterative section '{Encoding.UTF8.GetString(idstr)}' not parsed (offset {_position})");
                    return false;
                }
                _ramSectionId = sectionId;
                _ramInEndSection = false;
                _state = State.RamRecords;
                segment = Raw(6 + idLen + 8);
                return true;
            }
            case QemuFormat.SectionPart:
            case QemuFormat.SectionEnd:
            {
                if (input.Length < 5) return false;
                uint sectionId = BinaryPrimitives.ReadUInt32BigEndian(input[1..]);
                if (sectionId == _bitmapSectionId)
                {
                    _state = State.BitmapChunks;
                    segment = Raw(5);
                    return true;
                }
                if (sectionId != _ramSectionId)
                {
                    GoOpaque($"section {sectionId} is not ram (offset {_position})");
                    return false;
                }
                _ramInEndSection = type == QemuFormat.SectionEnd;
                _ramIterating |= type == QemuFormat.SectionPart;
                _state = State.RamRecords;
                segment = Raw(5);
                return true;
            }
            case QemuFormat.SectionFooter:
                if (input.Length < 5) return false;
                segment = Raw(5);
                return true;
            case QemuFormat.Command:
            {
                if (input.Length < 5) return false;
                ushort cmd = BinaryPrimitives.ReadUInt16BigEndian(input[1..]);
                ushort len = BinaryPrimitives.ReadUInt16BigEndian(input[3..]);
                // POSTCOPY_ADVISE also announces dirty-bitmap migration (libvirt checkpoints); only LISTEN/RUN would start postcopy.
                if (cmd is not (QemuFormat.CmdOpenReturnPath or QemuFormat.CmdPing or QemuFormat.CmdSwitchoverStart or QemuFormat.CmdPostcopyAdvise))
                {
                    PostCopy = cmd is >= QemuFormat.CmdPostcopyListen and <= QemuFormat.CmdPackaged or QemuFormat.CmdPostcopyResume or QemuFormat.CmdRecvBitmap;
                    GoOpaque($"command {cmd} (postcopy, packaged or colo) at offset {_position}");
                    return false;
                }
                // QEMU's own are 0 to 16 bytes; a longer one would break the segment bound (found by afl++).
                if (5 + len > MaxRecordLength)
                {
                    GoOpaque($"command {cmd} with a {len}-byte body at offset {_position}");
                    return false;
                }
                if (input.Length < 5 + len) return false;
                _postCopyRamAdvised |= cmd == QemuFormat.CmdPostcopyAdvise && len == QemuFormat.PostcopyAdviseRamLength;
                segment = Raw(5 + len);
                return true;
            }
            case QemuFormat.SectionEof:
                GoOpaque("end of stream");
                return false;
            default:
                GoOpaque($"section type 0x{type:x2} at offset {_position}");
                return false;
        }
    }
}
