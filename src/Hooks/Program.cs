using BFMig.Native;

namespace BFMig.Hooks;

internal static class Program
{
    private static int Main(string[] args)
    {
        if (args is ["--version"])
        {
            Console.WriteLine($"bfmig-hook {BuildInfo.Version}");
            return 0;
        }
        Console.Error.WriteLine("bfmig-hook: not built yet in this version (see issue tracker)");
        return 2;
    }
}
