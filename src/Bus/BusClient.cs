using Tmds.DBus.Protocol;

namespace BFMig.Bus;

/// <summary>Appends a call's arguments (the writer is a struct: it must be passed by reference).</summary>
public delegate void BodyWriter(ref MessageWriter writer);

/// <summary>
/// A connection for callers that wait for their answer (the CLI, the hook, tests): every call has
/// a deadline, because Tmds.DBus.Protocol's calls have none and a bus that accepts but never
/// answers would otherwise hold the caller forever. Failures surface as Tmds's exceptions
/// (<see cref="DBusErrorReplyException"/>: the peer answered with an error;
/// <see cref="DBusConnectionException"/>: no usable bus) or as <see cref="TimeoutException"/>.
/// </summary>
public sealed class BusClient : IDisposable
{
    private BusClient(DBusConnection connection, string? address)
    {
        Connection = connection;
        Address = address;
    }

    /// <summary>The Tmds connection (signal subscriptions use it directly).</summary>
    public DBusConnection Connection { get; }

    /// <summary>The bus address given, null for the system bus.</summary>
    public string? Address { get; }

    /// <summary>Connects and says Hello to the bus at <paramref name="address"/> (null: the system bus) within <paramref name="timeout"/>.</summary>
    public static BusClient Connect(string? address, TimeSpan timeout) =>
        ConnectAsync(address, timeout).GetAwaiter().GetResult();

    /// <inheritdoc cref="Connect"/>
    public static async Task<BusClient> ConnectAsync(string? address, TimeSpan timeout)
    {
        string resolved = address ?? DBusAddress.System ?? throw new DBusConnectFailedException("no system bus address is known");
        var connection = new DBusConnection(new DBusConnectionOptions(resolved) { AutoConnect = false });
        try
        {
            await connection.ConnectAsync().AsTask().WaitAsync(timeout).ConfigureAwait(false);
            return new BusClient(connection, address);
        }
        catch (Exception e) when (e is DBusConnectionException or System.Net.Sockets.SocketException && MissingSocket(resolved) is { } path)
        {
            connection.Dispose();
            // .NET reports a unix socket path that does not exist as "Cannot assign requested address".
            throw new DBusConnectFailedException($"{path}: No such file or directory", e);
        }
        catch
        {
            connection.Dispose();
            throw;
        }
    }

    /// <summary>The path of a <c>unix:path=</c> address whose socket file does not exist, else null.</summary>
    private static string? MissingSocket(string address)
    {
        const string Prefix = "unix:path=";
        if (!address.StartsWith(Prefix, StringComparison.Ordinal))
            return null;
        string path = address[Prefix.Length..].Split([',', ';'])[0];
        return File.Exists(path) ? null : path;
    }

    /// <summary>Calls a method and waits for its reply (at most <paramref name="timeout"/>).</summary>
    public T Call<T>(string destination, string path, string interfaceName, string member, string? signature, BodyWriter? write,
        MessageValueReader<T> read, TimeSpan timeout) =>
        CallAsync(destination, path, interfaceName, member, signature, write, read, timeout).GetAwaiter().GetResult();

    /// <inheritdoc cref="Call"/>
    public async Task<T> CallAsync<T>(string destination, string path, string interfaceName, string member, string? signature, BodyWriter? write,
        MessageValueReader<T> read, TimeSpan timeout)
    {
        MessageBuffer message = CreateCall(Connection, destination, path, interfaceName, member, signature, write);
        try
        {
            return await Connection.CallMethodAsync(message, read, null).WaitAsync(timeout).ConfigureAwait(false);
        }
        catch (TimeoutException)
        {
            throw new TimeoutException($"no answer to {interfaceName}.{member} from {destination} within {timeout.TotalSeconds:0.#} s");
        }
    }

    /// <summary>A method call message (no reply expected flags; the caller decides how to send it).</summary>
    public static MessageBuffer CreateCall(DBusConnection connection, string destination, string path, string interfaceName, string member,
        string? signature, BodyWriter? write)
    {
        MessageWriter writer = connection.GetMessageWriter();
        try
        {
            writer.WriteMethodCallHeader(destination, path, interfaceName, member, signature);
            write?.Invoke(ref writer);
            return writer.CreateMessage();
        }
        finally
        {
            writer.Dispose();
        }
    }

    public void Dispose() => Connection.Dispose();
}
