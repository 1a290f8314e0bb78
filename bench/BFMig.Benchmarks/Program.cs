using BenchmarkDotNet.Running;

namespace BFMig.Benchmarks;

internal static class Program
{
    private static int Main(string[] args)
    {
        if (args is ["replay-big", var helper, ..] && OperatingSystem.IsLinux())
            return BigReplay.Run(helper, args.Length > 2 ? int.Parse(args[2], System.Globalization.CultureInfo.InvariantCulture) : 16,
                args.Length > 3 ? int.Parse(args[3], System.Globalization.CultureInfo.InvariantCulture) : 10);
        if (args is ["replay", ..])
            return Replay.Run(args.Length > 1 && int.TryParse(args[1], out int mb) ? mb : 256);
        if (args is ["micro"]) return Micro.Run();
        if (args is ["sender", var scenario, ..])
            return SenderLoop.Run(scenario, args.Length > 2 ? int.Parse(args[2]) : 128, args.Length > 3 ? int.Parse(args[3]) : 4);
        if (args is ["bdn", ..])
        {
            BenchmarkSwitcher.FromAssembly(typeof(Program).Assembly).Run(args[1..]);
            return 0;
        }
        Console.Error.WriteLine("usage: BFMig.Benchmarks replay [MiB] | replay-big HELPER [GiB] [changed %] | bdn [BenchmarkDotNet args]");
        return 2;
    }
}
