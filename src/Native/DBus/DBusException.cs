using System.Runtime.InteropServices;

namespace BFMig.Native.DBus;

/// <summary>
/// A D-Bus call failed: either the peer answered with an error (<see cref="ErrorName"/> is the
/// D-Bus error name, e.g. <c>org.freedesktop.DBus.Error.AccessDenied</c>) or sd-bus failed locally
/// (<see cref="Errno"/> is set, name <c>System.Error.*</c>). The connection may still be usable;
/// check <see cref="DBusConnection.IsOpen"/>.
/// </summary>
public sealed class DBusException : Exception
{
    public DBusException(string errorName, string message) : base($"{errorName}: {message}")
    {
        ErrorName = errorName;
        ErrorMessage = message;
    }

    private DBusException(string errorName, string message, int errno) : this(errorName, message) => Errno = errno;

    /// <summary>The D-Bus error name.</summary>
    public string ErrorName { get; }

    /// <summary>The error's message text, as the peer sent it.</summary>
    public string ErrorMessage { get; }

    /// <summary>The errno of a local sd-bus failure, 0 for an error reply from the peer.</summary>
    public int Errno { get; }

    internal static DBusException FromErrno(int errno, string operation) =>
        new($"System.Error.{errno}", $"{operation}: {Marshal.GetPInvokeErrorMessage(errno)} (errno {errno})", errno);
}

/// <summary>Well-known D-Bus error names.</summary>
public static class DBusErrorNames
{
    public const string Failed = "org.freedesktop.DBus.Error.Failed";
    public const string AccessDenied = "org.freedesktop.DBus.Error.AccessDenied";
    public const string InvalidArgs = "org.freedesktop.DBus.Error.InvalidArgs";
    public const string UnknownMethod = "org.freedesktop.DBus.Error.UnknownMethod";
    public const string ServiceUnknown = "org.freedesktop.DBus.Error.ServiceUnknown";
    public const string NoReply = "org.freedesktop.DBus.Error.NoReply";
    public const string Timeout = "org.freedesktop.DBus.Error.Timeout";
}
