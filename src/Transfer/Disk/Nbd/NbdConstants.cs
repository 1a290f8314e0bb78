using BFMig.Transfer.Wire;

namespace BFMig.Transfer.Disk.Nbd;

/// <summary>Magic numbers of the NBD protocol (NetworkBlockDevice/nbd doc/proto.md), all big-endian on the wire.</summary>
public static class NbdMagic
{
    /// <summary>"NBDMAGIC", first 8 bytes the server sends.</summary>
    public const ulong Init = 0x4e42444d41474943;

    /// <summary>"IHAVEOPT": newstyle greeting and prefix of every client option.</summary>
    public const ulong HaveOpt = 0x49484156454F5054;

    /// <summary>Oldstyle negotiation (not supported: QEMU has not used it for a decade).</summary>
    public const ulong OldStyle = 0x00420281861253;

    /// <summary>Prefix of every option reply.</summary>
    public const ulong OptionReply = 0x3e889045565a9;

    /// <summary>Compact (28-byte) request header.</summary>
    public const uint Request = 0x25609513;

    /// <summary>Extended (32-byte) request header, once NBD_OPT_EXTENDED_HEADERS was accepted.</summary>
    public const uint ExtendedRequest = 0x21e41c71;

    /// <summary>Simple reply (16 bytes).</summary>
    public const uint SimpleReply = 0x67446698;

    /// <summary>Structured reply chunk (20-byte header).</summary>
    public const uint StructuredReply = 0x668e33ef;

    /// <summary>Extended reply chunk (32-byte header), the only reply form with extended headers.</summary>
    public const uint ExtendedReply = 0x6e8a278c;
}

/// <summary>Handshake flags the server sends after IHAVEOPT.</summary>
[Flags]
public enum NbdHandshakeFlags : ushort
{
    None = 0,
    FixedNewstyle = 1,
    NoZeroes = 2,
}

/// <summary>Flags the client answers the greeting with.</summary>
[Flags]
public enum NbdClientFlags : uint
{
    None = 0,
    FixedNewstyle = 1,
    NoZeroes = 2,
}

/// <summary>Option types a client may send during the handshake.</summary>
public enum NbdOption : uint
{
    ExportName = 1,
    Abort = 2,
    List = 3,
    PeekExport = 4,
    StartTls = 5,
    Info = 6,
    Go = 7,
    StructuredReply = 8,
    ListMetaContext = 9,
    SetMetaContext = 10,
    ExtendedHeaders = 11,
}

/// <summary>Option reply types; errors have bit 31 set.</summary>
public enum NbdOptionReplyType : uint
{
    Ack = 1,
    Server = 2,
    Info = 3,
    MetaContext = 4,
    ErrorUnsupported = 0x80000001,
    ErrorPolicy = 0x80000002,
    ErrorInvalid = 0x80000003,
    ErrorPlatform = 0x80000004,
    ErrorTlsRequired = 0x80000005,
    ErrorUnknown = 0x80000006,
    ErrorShutdown = 0x80000007,
    ErrorBlockSizeRequired = 0x80000008,
    ErrorTooBig = 0x80000009,
    ErrorExtHeaderRequired = 0x8000000a,
}

/// <summary>Information types in an NBD_REP_INFO reply.</summary>
public enum NbdInfoType : ushort
{
    Export = 0,
    Name = 1,
    Description = 2,
    BlockSize = 3,
}

/// <summary>Transmission flags of an export.</summary>
[Flags]
public enum NbdTransmissionFlags : ushort
{
    None = 0,
    HasFlags = 1 << 0,
    ReadOnly = 1 << 1,
    SendFlush = 1 << 2,
    SendFua = 1 << 3,
    Rotational = 1 << 4,
    SendTrim = 1 << 5,
    SendWriteZeroes = 1 << 6,
    SendDf = 1 << 7,
    CanMultiConn = 1 << 8,
    SendResize = 1 << 9,
    SendCache = 1 << 10,
    SendFastZero = 1 << 11,
    BlockStatusPayload = 1 << 12,
}

/// <summary>Transmission-phase commands.</summary>
public enum NbdCommand : ushort
{
    Read = 0,
    Write = 1,
    Disconnect = 2,
    Flush = 3,
    Trim = 4,
    Cache = 5,
    WriteZeroes = 6,
    BlockStatus = 7,
    Resize = 8,
}

/// <summary>Per-command flags.</summary>
[Flags]
public enum NbdCommandFlags : ushort
{
    None = 0,
    Fua = 1 << 0,
    NoHole = 1 << 1,
    DontFragment = 1 << 2,
    RequestOne = 1 << 3,
    FastZero = 1 << 4,
    PayloadLength = 1 << 5,
}

/// <summary>Structured/extended reply chunk types.</summary>
public enum NbdReplyChunkType : ushort
{
    None = 0,
    OffsetData = 1,
    OffsetHole = 2,
    BlockStatus = 5,
    BlockStatusExtended = 6,
    Error = (1 << 15) | 1,
    ErrorOffset = (1 << 15) | 2,
}

/// <summary>Which request/reply header form the transmission phase uses.</summary>
public enum NbdHeaderStyle
{
    /// <summary>28-byte requests, simple replies only.</summary>
    Compact,

    /// <summary>28-byte requests, simple or structured replies.</summary>
    Structured,

    /// <summary>32-byte requests with 64-bit length, extended reply chunks only.</summary>
    Extended,
}

/// <summary>Errno values the protocol carries (Linux numbering, as the spec mandates).</summary>
public static class NbdError
{
    public const uint None = 0;
    public const uint Perm = 1;
    public const uint IO = 5;
    public const uint NoMem = 12;
    public const uint Invalid = 22;
    public const uint NoSpace = 28;
    public const uint Overflow = 75;
    public const uint NotSupported = 95;
    public const uint Shutdown = 108;
}

/// <summary>Reply flag marking the last chunk of a structured/extended reply.</summary>
public static class NbdReplyFlags
{
    public const ushort Done = 1;
}
