namespace BFMig.Bus;

/// <summary>Error names of the bus daemon that bfmig's clients tell apart.</summary>
public static class BusErrorNames
{
    public const string Failed = "org.freedesktop.DBus.Error.Failed";
    public const string AccessDenied = "org.freedesktop.DBus.Error.AccessDenied";
    public const string InvalidArgs = "org.freedesktop.DBus.Error.InvalidArgs";
    public const string UnknownMethod = "org.freedesktop.DBus.Error.UnknownMethod";
    public const string ServiceUnknown = "org.freedesktop.DBus.Error.ServiceUnknown";
    public const string NameHasNoOwner = "org.freedesktop.DBus.Error.NameHasNoOwner";
    public const string NoReply = "org.freedesktop.DBus.Error.NoReply";
    public const string Timeout = "org.freedesktop.DBus.Error.Timeout";
}
