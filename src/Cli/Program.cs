using BFMig.Native;

namespace BFMig.Cli;

internal static class Program
{
    private static int Main(string[] args)
    {
        if (args is ["--version"])
        {
            Console.WriteLine($"bfmig {BuildInfo.Version}");
            return 0;
        }
        Console.Error.WriteLine("bfmig: not built yet in this version (see issue tracker)");
        return 2;
    }
}
