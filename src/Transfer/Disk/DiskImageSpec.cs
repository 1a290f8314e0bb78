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

    /// <summary>The <c>--image</c> value for <paramref name="export"/>.</summary>
    public string ToArgument(string export) => $"{export}={Format}:{Path}";
}
