using BFMig.Native;

namespace BFMig.Transfer;

internal static class Program
{
    private static int Main(string[] args)
    {
        if (args is ["--version"])
        {
            Console.WriteLine($"bfmig-transfer {BuildInfo.Version}");
            return 0;
        }
        Console.Error.WriteLine("bfmig-transfer: not built yet in this version (see issue tracker)");
        return 2;
    }
}
