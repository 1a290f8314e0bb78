using System.CommandLine;
using System.CommandLine.Invocation;
using System.CommandLine.Parsing;
using BFMig.Native;

namespace BFMig.Cli;

/// <summary>
/// bfmig's entry point. Exit status: 0 success, 1 the command failed (one "bfmig: ..." line on
/// standard error says why), 2 usage error (one line, then a pointer to --help).
/// </summary>
internal static class Program
{
    public const int Failed = 1;
    public const int UsageError = 2;

    private static int Main(string[] args)
    {
        RootCommand root = BuildCommands();
        ParseResult parse = root.Parse(args);
        if (parse.Action is ParseErrorAction && parse.Errors.Count > 0)
        {
            // An unknown word explains more than the "command missing" that follows from it.
            ParseError error = parse.Errors.FirstOrDefault(e => parse.UnmatchedTokens.Any(t => e.Message.Contains(t, StringComparison.Ordinal)))
                ?? parse.Errors[0];
            Console.Error.WriteLine($"bfmig: {error.Message.TrimEnd('.')} (see bfmig --help)");
            return UsageError;
        }
        try
        {
            return parse.Invoke(new InvocationConfiguration { EnableDefaultExceptionHandler = false });
        }
        catch (CommandFailedException e)
        {
            Console.Out.Flush();
            Console.Error.WriteLine($"bfmig: {e.Message}");
            return Failed;
        }
    }

    private static RootCommand BuildCommands()
    {
        var json = new Option<bool>("--json") { Description = "Machine-readable output (one JSON document on standard output)", Recursive = true };
        var busAddress = new Option<string?>("--bus-address")
        {
            Description = $"D-Bus address of the bus bfmigd is on (default: ${DaemonClient.BusAddressVariable}, else the system bus)",
            HelpName = "ADDR",
            Recursive = true,
        };
        GlobalOptions Globals(ParseResult p) => new(p.GetValue(json), p.GetValue(busAddress));

        var root = new RootCommand("bfmig: cheap back-and-forth live migration of libvirt guests (talks to bfmigd over D-Bus)");
        root.Options.Add(json);
        root.Options.Add(busAddress);
        // The library's --version prints the assembly version; ours is BuildInfo.Version, like the other binaries.
        foreach (VersionOption version in root.Options.OfType<VersionOption>())
        {
            version.Action = new PrintVersion();
        }

        var status = new Command("status", "Daemon health, host name, peers and transfers in progress");
        status.SetAction(p => Commands.Status(Globals(p)));

        var list = new Command("list", "Retained guests: where each is, generation, retained memory and disk");
        list.SetAction(p => Commands.List(Globals(p)));

        var guest = new Argument<string>("GUEST") { Description = "Guest name or UUID" };
        var peer = new Argument<string>("PEER") { Description = "Peer host, as named in bfmig.conf" };

        var estimate = new Command("estimate", "What a trip of GUEST to PEER would move, with BFMig and stock") { guest, peer };
        estimate.SetAction(p => Commands.Estimate(Globals(p), p.GetRequiredValue(guest), p.GetRequiredValue(peer)));

        var dryRun = new Option<bool>("--dry-run") { Description = "Print the virsh command instead of running it" };
        var migrate = new Command("migrate", "Live-migrate GUEST to PEER through BFMig (runs virsh migrate) and show progress") { guest, peer, dryRun };
        migrate.SetAction(p => Migration.Run(Globals(p), p.GetRequiredValue(guest), p.GetRequiredValue(peer), p.GetValue(dryRun)));

        var forget = new Command("forget", "Drop everything retained for GUEST on this host (root only)") { guest };
        forget.SetAction(p => Commands.Forget(Globals(p), p.GetRequiredValue(guest)));

        var doctor = new Command("doctor", "Check this host's setup; exits 1 when a check fails");
        doctor.SetAction(p => Commands.Doctor(Globals(p)));

        foreach (Command command in new[] { status, list, estimate, migrate, forget, doctor })
        {
            root.Subcommands.Add(command);
        }
        return root;
    }

    private sealed class PrintVersion : SynchronousCommandLineAction
    {
        public override int Invoke(ParseResult parseResult)
        {
            Console.Out.WriteLine($"bfmig {BuildInfo.Version}");
            return 0;
        }
    }
}
