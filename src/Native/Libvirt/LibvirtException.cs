namespace BFMig.Native.Libvirt;

/// <summary>
/// A libvirt call failed. The connection is usually still usable (check <see cref="Code"/>:
/// <see cref="LibvirtErrorCode.NoConnect"/> or <see cref="LibvirtErrorCode.Rpc"/> mean it is not).
/// Retrying the same call repeats the same failure unless the guest or host state changed.
/// </summary>
public sealed class LibvirtException : Exception
{
    internal LibvirtException(string operation, LibvirtErrorCode code, LibvirtErrorDomain domain, string libvirtMessage)
        : base($"{operation}: {libvirtMessage} (libvirt error {(int)code} {code}, from {domain})")
    {
        Operation = operation;
        Code = code;
        Domain = domain;
        LibvirtMessage = libvirtMessage;
    }

    /// <summary>The wrapper that failed (for example <c>LookupDomainByName</c>).</summary>
    public string Operation { get; }

    /// <summary>libvirt's virErrorNumber.</summary>
    public LibvirtErrorCode Code { get; }

    /// <summary>libvirt's virErrorDomain: which part of libvirt raised it.</summary>
    public LibvirtErrorDomain Domain { get; }

    /// <summary>libvirt's own message, unchanged.</summary>
    public string LibvirtMessage { get; }
}

/// <summary>virErrorNumber values BFMig looks at (libvirt keeps these stable; others still come through as numbers).</summary>
public enum LibvirtErrorCode
{
    Ok = 0,
    InternalError = 1,
    NoMemory = 2,
    NoSupport = 3,
    NoConnect = 5,
    InvalidConnection = 6,
    InvalidDomain = 7,
    InvalidArgument = 8,
    OperationFailed = 9,
    XmlError = 27,
    DomainExists = 28,
    OperationDenied = 29,
    XmlDetail = 35,
    SystemError = 38,
    Rpc = 39,
    NoDomain = 42,
    AuthFailed = 45,
    OperationInvalid = 55,
    ConfigUnsupported = 67,
    OperationTimeout = 68,
    MigratePersistFailed = 69,
    HookScriptFailed = 70,
    InvalidDomainSnapshot = 71,
    NoDomainSnapshot = 72,
    ArgumentUnsupported = 74,
    OperationAborted = 78,
    MigrateUnsafe = 81,
    OperationUnsupported = 84,
    AgentUnresponsive = 86,
    ResourceBusy = 87,
    AccessDenied = 88,
    XmlInvalidSchema = 92,
    InvalidDomainCheckpoint = 102,
    NoDomainCheckpoint = 103,
    CheckpointInconsistent = 109,
    MultipleDomains = 110,
}

/// <summary>virErrorDomain values (the subsystem that raised an error).</summary>
public enum LibvirtErrorDomain
{
    None = 0,
    Xml = 5,
    Dom = 6,
    Rpc = 7,
    Conf = 9,
    Qemu = 10,
    Test = 12,
    Remote = 13,
    Storage = 18,
    Domain = 20,
    Security = 24,
    Hook = 34,
    DomainSnapshot = 35,
    Event = 40,
    Uri = 45,
    Auth = 46,
    Access = 55,
    DomainCheckpoint = 69,
}
