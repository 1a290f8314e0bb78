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
        // libvirt waits for us on every guest event: no logging framework, no configuration files.
        return Hook.Run(args, Console.In, Console.Out, Console.Error, HookSettings.FromEnvironment());
    }
}
