namespace BFMig.Transfer.Memory;

/// <summary>Constants of the QEMU migration stream (migration/savevm.c, migration/ram.c), QEMU 7.2 to 10.0.</summary>
public static class QemuFormat
{
    public const uint FileMagic = 0x5145564d; // "QEVM"
    public const uint FileVersion = 3;
    public const uint MultifdMagic = 0x11223344;
    public const int PageSize = 4096;
    public const int PageShift = 12;

    public const byte SectionEof = 0x00;
    public const byte SectionStart = 0x01;
    public const byte SectionPart = 0x02;
    public const byte SectionEnd = 0x03;
    public const byte SectionFull = 0x04;
    public const byte Subsection = 0x05;
    public const byte VmDescription = 0x06;
    public const byte Configuration = 0x07;
    public const byte Command = 0x08;
    public const byte SectionFooter = 0x7e;

    public const ushort CmdOpenReturnPath = 1;
    public const ushort CmdPing = 2;
    /// <summary>Sent when postcopy or dirty-bitmap migration is enabled (length 0 with bitmaps only, 16 with postcopy-ram).</summary>
    public const ushort CmdPostcopyAdvise = 3;
    /// <summary>POSTCOPY_ADVISE's body with post-copy RAM on: the host page size summary and the target page size, be64 each.</summary>
    public const ushort PostcopyAdviseRamLength = 16;
    /// <summary>POSTCOPY_LISTEN, POSTCOPY_RUN, POSTCOPY_RAM_DISCARD and PACKAGED (4 to 7): the source QEMU is switching to post-copy.</summary>
    public const ushort CmdPostcopyListen = 4, CmdPackaged = 7;
    /// <summary>ENABLE_COLO: opaque, not post-copy.</summary>
    public const ushort CmdEnableColo = 8;
    /// <summary>POSTCOPY_RESUME and RECV_BITMAP (9, 10): a paused post-copy migration being recovered.</summary>
    public const ushort CmdPostcopyResume = 9, CmdRecvBitmap = 10;
    public const ushort CmdSwitchoverStart = 11;

    public const ulong FlagZero = 0x02;
    public const ulong FlagMemSize = 0x04;
    public const ulong FlagPage = 0x08;
    public const ulong FlagEos = 0x10;
    public const ulong FlagContinue = 0x20;
    public const ulong FlagXbzrle = 0x40;
    public const ulong FlagHook = 0x80;
    public const ulong FlagCompressPage = 0x100;
    public const ulong FlagMultifdFlush = 0x200;
    public const ulong FlagMask = PageSize - 1;

    /// <summary>ENCODING_FLAG_XBZRLE, the only xbzrle header flag QEMU defines.</summary>
    public const byte XbzrleEncoding = 0x01;
}
