using BFMig.Native;

namespace BFMig.Daemon;

internal static class Program
{
    private static int Main(string[] args)
    {
        if (args is ["--version"])
        {
            Console.WriteLine($"bfmigd {BuildInfo.Version}");
            return 0;
        }
        Console.Error.WriteLine("bfmigd: not built yet in this version (see issue tracker)");
        return 2;
    }
}
