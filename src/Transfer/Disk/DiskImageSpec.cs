using System.Buffers.Binary;
using BFMig.Native.Linux;

namespace BFMig.Transfer.Disk;

/// <summary>
/// The image file behind one NBD export on this host, as the daemon read it from the domain
/// XML: on the source the image the mirror reads, on the destination the one it writes into.
/// </summary>
/// <param name="Path">Absolute path of the image file.</param>
/// <param name="Format">Image format as QEMU names it ("qcow2", "raw").</param>
public sealed record DiskImageSpec(string Path, string Format)
{
    /// <summary>
    /// Parses <c>EXPORT=FORMAT:PATH</c> (the helper's <c>--image</c> value; the export name ends at
    /// the first '=', the format at the first ':' after it). Throws <see cref="FormatException"/>.
    /// </summary>
    public static (string Export, DiskImageSpec Image) Parse(string value)
    {
        int eq = value.IndexOf('=', StringComparison.Ordinal);
        int colon = eq < 0 ? -1 : value.IndexOf(':', eq + 1);
        if (eq < 0 || colon < 0)
            throw new FormatException($"--image {value}: expected EXPORT=FORMAT:PATH");
        string format = value[(eq + 1)..colon];
        string path = value[(colon + 1)..];
        if (format.Length is 0 or > DiskImageIdentity.MaxFormatLength || !format.All(char.IsAsciiLetterOrDigit))
            throw new FormatException($"--image {value}: format '{format}' is not a QEMU format name");
        if (!path.StartsWith('/'))
            throw new FormatException($"--image {value}: the image path must be absolute");
        return (value[..eq], new DiskImageSpec(path, format));
    }

    /// <summary>
    /// The disk's virtual size: a qcow2 header's size field, a raw file's length, a raw block
    /// device's size (opened only as <see cref="DeviceNode"/> allows, <paramref name="qemu"/>
    /// being the user libvirt may have lent it to). Null when it cannot be read or the format is another.
    /// </summary>
    public ulong? ReadVirtualSize(NodeOwner? qemu = null)
    {
        try
        {
            if (Format == "raw" && DeviceNode.IsBlockDevice(Path))
            {
                using var device = DeviceNode.OpenBlockDeviceForReading(Path, qemu).Handle;
                return DeviceNode.Size(device) is > 0 and var size ? (ulong)size : null;
            }
            if (Format == "raw")
                // The file a link names, not the link (FileInfo.Length of a link is the link's own).
                return new FileInfo(Path).ResolveLinkTarget(returnFinalTarget: true) is FileInfo { Exists: true } target ? Positive(target.Length)
                    : new FileInfo(Path).Length is > 0 and var length ? (ulong)length : null;
            if (Format != "qcow2")
                return null;
            // qcow2 header (QEMU docs/interop/qcow2.txt): be32 magic "QFI\xfb" at 0, be64 size at 24.
            Span<byte> header = stackalloc byte[32];
            using var file = File.OpenHandle(Path, FileMode.Open, FileAccess.Read, FileShare.ReadWrite | FileShare.Delete);
            if (RandomAccess.Read(file, header, 0) < header.Length || BinaryPrimitives.ReadUInt32BigEndian(header) != 0x514649fb)
                return null;
            return BinaryPrimitives.ReadUInt64BigEndian(header[24..]);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            return null;
        }
    }

    private static ulong? Positive(long length) => length > 0 ? (ulong)length : null;

    /// <summary>The <c>--image</c> value for <paramref name="export"/>.</summary>
    public string ToArgument(string export) => $"{export}={Format}:{Path}";
}
