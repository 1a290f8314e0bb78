namespace BFMig.Native.DBus;

/// <summary>Handles one incoming method call on the connection's processing thread. Reply (or defer) before returning.</summary>
public delegate void DBusMethodHandler(DBusMethodCall call);

/// <summary>
/// An object to export: one interface at one path, its methods and signals. The signatures and
/// argument names become the object's introspection data (they should match the checked-in XML).
/// </summary>
public sealed class DBusObject
{
    private readonly List<DBusMethodDefinition> _methods = [];
    private readonly List<DBusSignalDefinition> _signals = [];

    public DBusObject(string path, string interfaceName)
    {
        ArgumentException.ThrowIfNullOrEmpty(path);
        ArgumentException.ThrowIfNullOrEmpty(interfaceName);
        Path = path;
        Interface = interfaceName;
    }

    public string Path { get; }

    public string Interface { get; }

    public IReadOnlyList<DBusMethodDefinition> Methods => _methods;

    public IReadOnlyList<DBusSignalDefinition> Signals => _signals;

    /// <summary>
    /// Adds a method. <paramref name="inNames"/>/<paramref name="outNames"/>: one name per complete
    /// type of the signature, or none (sd-bus refuses the export otherwise).
    /// </summary>
    public DBusObject AddMethod(string name, string inSignature, string outSignature, DBusMethodHandler handler,
        IReadOnlyList<string>? inNames = null, IReadOnlyList<string>? outNames = null,
        DBusMethodAccess access = DBusMethodAccess.Privileged)
    {
        ArgumentException.ThrowIfNullOrEmpty(name);
        ArgumentNullException.ThrowIfNull(handler);
        _methods.Add(new DBusMethodDefinition(name, inSignature ?? "", outSignature ?? "", handler, inNames ?? [], outNames ?? [], access));
        return this;
    }

    public DBusObject AddSignal(string name, string signature, IReadOnlyList<string>? names = null)
    {
        ArgumentException.ThrowIfNullOrEmpty(name);
        _signals.Add(new DBusSignalDefinition(name, signature ?? "", names ?? []));
        return this;
    }
}

public sealed record DBusMethodDefinition(string Name, string InSignature, string OutSignature, DBusMethodHandler Handler,
    IReadOnlyList<string> InNames, IReadOnlyList<string> OutNames, DBusMethodAccess Access = DBusMethodAccess.Privileged);

/// <summary>Who sd-bus lets through to a method handler, before the handler's own checks.</summary>
public enum DBusMethodAccess
{
    /// <summary>
    /// sd-bus's default: callers with the same uid as this process, or with CAP_SYS_ADMIN; others
    /// get org.freedesktop.DBus.Error.AccessDenied without the handler running.
    /// </summary>
    Privileged = 0,

    /// <summary>
    /// Everyone the bus policy lets send to us (SD_BUS_VTABLE_UNPRIVILEGED); the handler decides,
    /// e.g. with <see cref="DBusMethodCall.GetSenderUid"/>.
    /// </summary>
    Anyone = 1,
}

public sealed record DBusSignalDefinition(string Name, string Signature, IReadOnlyList<string> Names);
