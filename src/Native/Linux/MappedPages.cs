namespace BFMig.Native.Linux;

/// <summary>The pages a process maps from a file.</summary>
public static unsafe class MappedPages
{
    private const int MadvDontNeed = 4;

    /// <summary>
    /// Unmaps the resident pages of a read-only shared file mapping from this process
    /// (MADV_DONTNEED): the page cache keeps them and the next access maps them again, but the
    /// process's RSS no longer counts every page it once read. Returns false when the kernel
    /// refused (the pages then simply stay mapped). <paramref name="address"/> must be page-aligned.
    /// </summary>
    public static bool Release(void* address, long length) =>
        length <= 0 || Interop.Libc.Madvise(address, (nuint)length, MadvDontNeed) == 0;
}
