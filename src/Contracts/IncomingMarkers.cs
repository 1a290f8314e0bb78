namespace BFMig.Contracts;

/// <summary>
/// The hook's own record of an <see cref="IncomingAnnouncement"/>, for when bfmigd does not answer:
/// <c>RUN/incoming/UUID</c> while announced, <c>RUN/incoming/UUID.prepared</c> once it let a prepare
/// through; the file's modification time is the announcement's. Root-owned directories: neither a
/// guest nor the QEMU user can plant one. bfmigd reads them with the same rules (a peer's streams
/// are let in while the hook's marker is fresh, even when bfmigd missed the hook's call).
/// </summary>
[System.Runtime.Versioning.SupportedOSPlatform("linux")]
public sealed class IncomingMarkers(string runDirectory, Guid uuid)
{
    private readonly string _announced = DefaultPaths.IncomingMarker(runDirectory, uuid);
    private string Prepared => _announced + ".prepared";

    private const UnixFileMode DirectoryMode = UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.UserExecute;

    public IncomingAnnouncement? Read()
    {
        // A marker lets a guest in, so only one in a directory nobody but root can write counts;
        // without it the local rule refuses the return trip while bfmigd is down, the safe side.
        if (!IsTrustedDirectory(new DirectoryInfo(Path.GetDirectoryName(_announced)!)))
        {
            return null;
        }
        if (File.Exists(Prepared))
        {
            return new IncomingAnnouncement(File.GetLastWriteTimeUtc(Prepared), Prepared: true);
        }
        return File.Exists(_announced) ? new IncomingAnnouncement(File.GetLastWriteTimeUtc(_announced), Prepared: false) : null;
    }

    public void Write(IncomingAnnouncement? announcement, TextWriter stderr)
    {
        try
        {
            switch (announcement)
            {
                case null:
                    File.Delete(_announced);
                    File.Delete(Prepared);
                    break;
                case { Prepared: false } a:
                    EnsureDirectory();
                    File.Delete(Prepared);
                    Touch(_announced, a.At);
                    break;
                case { } a:
                    EnsureDirectory();
                    Touch(Prepared, a.At);
                    File.Delete(_announced);
                    break;
            }
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            // Without the marker the local rule refuses the return trip while bfmigd is down: say why.
            stderr.WriteLine($"bfmig: warning: cannot update the incoming-migration marker {_announced}: {e.Message}");
        }
    }

    private void EnsureDirectory()
    {
        var directory = Directory.CreateDirectory(Path.GetDirectoryName(_announced)!, DirectoryMode);
        if (!IsTrustedDirectory(directory))
        {
            throw new IOException($"{directory.FullName} is a link or writable by others than root; not writing markers into it");
        }
    }

    private static bool IsTrustedDirectory(DirectoryInfo directory) =>
        directory.Exists && directory.LinkTarget is null &&
        (directory.UnixFileMode & (UnixFileMode.GroupWrite | UnixFileMode.OtherWrite)) == 0;

    private static void Touch(string path, DateTimeOffset at)
    {
        File.WriteAllText(path, at.ToString("O"));
        File.SetLastWriteTimeUtc(path, at.UtcDateTime);
    }
}
