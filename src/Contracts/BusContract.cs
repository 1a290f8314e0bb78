namespace BFMig.Contracts;

/// <summary>
/// bfmigd's D-Bus service as its three clients (the hook, the CLI, tests) address it. The method
/// signatures are in src/Daemon/org.bfmig.BFMig1.xml, the one description of the interface.
/// </summary>
public static class BusContract
{
    public const string BusName = "org.bfmig.BFMig1";
    public const string ObjectPath = "/org/bfmig/BFMig1";
    public const string Interface = "org.bfmig.BFMig1.Manager";

    /// <summary>Environment variable naming a bus other than the system bus (tests, the lab).</summary>
    public const string BusAddressVariable = "BFMIG_BUS_ADDRESS";
}
