using System.Runtime.InteropServices;
using Microsoft.Win32.SafeHandles;

namespace BFMig.Native.Linux;

/// <summary>
/// A file opened for reading without waiting on it, and what it is, asked of the descriptor
/// itself (statx): the checks of a root-only file (its type, owner, mode, size) and the read
/// then concern one and the same file, whatever happens to its path meanwhile. Opening never
/// blocks (a FIFO has no writer to wait for) and never makes a terminal this process's own.
/// </summary>
public sealed class OpenedFile : IDisposable
{
    private const int ORdOnly = 0;
    private const int ONoCtty = 0x100;
    private const int ONonBlock = 0x800;
    private const int OCloExec = 0x80000;
    private const int AtEmptyPath = 0x1000;
    private const uint StatxBasicStats = 0x7ff;
    // STATX_TYPE | STATX_MODE | STATX_UID | STATX_SIZE: what the caller judges the file by.
    private const uint StatxNeeded = 0x1 | 0x2 | 0x8 | 0x200;
    private const int StatxSize = 256;

    private OpenedFile(SafeFileHandle handle, uint mode, uint uid, long size)
    {
        Handle = handle;
        Mode = mode;
        Uid = uid;
        Size = size;
    }

    /// <summary>The open descriptor (read-only).</summary>
    public SafeFileHandle Handle { get; }

    /// <summary>st_mode: the file's type and permission bits.</summary>
    public uint Mode { get; }

    /// <summary>The file's owner.</summary>
    public uint Uid { get; }

    /// <summary>The file's size in bytes.</summary>
    public long Size { get; }

    /// <summary>A regular file (not a FIFO, device, socket or directory).</summary>
    public bool IsRegular => (Mode & 0xF000) == 0x8000;

    /// <summary>The permission bits (as <see cref="UnixFileMode"/>).</summary>
    public UnixFileMode Permissions => (UnixFileMode)(Mode & 0xFFF);

    /// <summary>Opens <paramref name="path"/> (following links) and reads its status; throws <see cref="IOException"/> saying why not.</summary>
    public static unsafe OpenedFile Open(string path)
    {
        int fd = Interop.Libc.Open(path, ORdOnly | ONoCtty | ONonBlock | OCloExec);
        if (fd < 0)
            throw Failure($"cannot open {path}");
        var handle = new SafeFileHandle(fd, ownsHandle: true);
        try
        {
            byte* buffer = stackalloc byte[StatxSize];
            fixed (byte* empty = ""u8)
            {
                if (Interop.Libc.Statx(fd, empty, AtEmptyPath, StatxBasicStats, buffer) != 0)
                    throw Failure($"cannot read the status of {path}");
            }
            var status = new ReadOnlySpan<byte>(buffer, StatxSize);
            // struct statx (native byte order): stx_mask at 0, stx_uid at 20, stx_mode at 28, stx_size at 40, on every architecture.
            if ((MemoryMarshal.Read<uint>(status) & StatxNeeded) != StatxNeeded)
                throw new IOException($"the status of {path} lacks its type, mode, owner or size");
            return new OpenedFile(handle, MemoryMarshal.Read<ushort>(status[28..]), MemoryMarshal.Read<uint>(status[20..]), (long)MemoryMarshal.Read<ulong>(status[40..]));
        }
        catch
        {
            handle.Dispose();
            throw;
        }
    }

    /// <summary>Reads the whole file (<see cref="Size"/> bytes at most); fewer when it shrank meanwhile.</summary>
    public byte[] ReadAll()
    {
        var bytes = new byte[Size];
        int total = 0;
        while (total < bytes.Length)
        {
            int n = RandomAccess.Read(Handle, bytes.AsSpan(total), total);
            if (n == 0)
                break;
            total += n;
        }
        return total == bytes.Length ? bytes : bytes[..total];
    }

    public void Dispose() => Handle.Dispose();

    private static IOException Failure(string what)
    {
        int errno = Marshal.GetLastPInvokeError();
        return new IOException($"{what}: {Marshal.GetPInvokeErrorMessage(errno)}");
    }
}
