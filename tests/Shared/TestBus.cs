using BFMig.Bus;
using BFMig.Contracts;
using Tmds.DBus.Protocol;

namespace BFMig.Tests.Shared;

/// <summary>An exported object for tests: <paramref name="handle"/> answers a call or returns false (UnknownMethod).</summary>
public sealed class TestObject(string path, Func<MethodContext, bool> handle) : IPathMethodHandler
{
    public string Path => path;

    public bool HandlesChildPaths => false;

    public ValueTask HandleMethodAsync(MethodContext context)
    {
        if (!handle(context))
            context.ReplyUnknownMethodError();
        return default;
    }
}

/// <summary>Reads a reply body (the reader is a ref struct: it must be passed by reference).</summary>
public delegate T BodyReader<T>(ref Reader reader);

/// <summary>Client and server shortcuts over Tmds.DBus.Protocol for the tests' private bus (linked into each test project).</summary>
public static class TestBus
{
    public static readonly TimeSpan Timeout = TimeSpan.FromSeconds(20);

    public static BusClient Open(string address) => BusClient.Connect(address, Timeout);

    /// <summary>Takes a well-known name (refused if another connection owns it).</summary>
    public static void RequestName(this BusClient client, string name) =>
        client.Connection.RequestNameAsync(name, RequestNameOptions.None).WaitAsync(Timeout).GetAwaiter().GetResult();

    /// <summary>Calls a method of bfmigd's Manager interface.</summary>
    public static T CallManager<T>(this BusClient client, string member, string signature, BodyWriter? write, MessageValueReader<T> read) =>
        client.Call(BusContract.BusName, BusContract.ObjectPath, BusContract.Interface, member, signature, write, read, Timeout);

    /// <summary>The in-signature of each Manager method the tests call with arguments.</summary>
    public static string InSignature(string member) => member switch
    {
        "HookEvent" => "sssss",
        "Forget" => "s",
        "Estimate" or "PrepareMigration" => "ss",
        _ => "",
    };

    /// <summary>Calls a Manager method; the in-signature comes from <see cref="InSignature"/>.</summary>
    public static T CallManager<T>(this BusClient client, string member, BodyWriter? write, BodyReader<T> read) =>
        client.CallManagerAsync(member, write, read).GetAwaiter().GetResult();

    /// <summary>
    /// <see cref="CallManager{T}(BusClient, string, BodyWriter?, BodyReader{T})"/> without blocking a thread: tests that
    /// host the daemon in their own process must not starve the thread pool the daemon answers on.
    /// </summary>
    public static Task<T> CallManagerAsync<T>(this BusClient client, string member, BodyWriter? write, BodyReader<T> read) =>
        client.CallAsync(BusContract.BusName, BusContract.ObjectPath, BusContract.Interface, member, InSignature(member), write, (m, _) =>
        {
            var r = m.GetBodyReader();
            return read(ref r);
        }, Timeout);

    /// <summary>Replies to <paramref name="context"/> with <paramref name="signature"/>'s values.</summary>
    public static void Reply(this MethodContext context, string signature, BodyWriter? write = null)
    {
        var writer = context.CreateReplyWriter(signature);
        try
        {
            write?.Invoke(ref writer);
            context.Reply(writer.CreateMessage());
        }
        finally
        {
            writer.Dispose();
        }
    }

    /// <summary>Sends a Manager signal from <paramref name="client"/>.</summary>
    public static void Emit(this BusClient client, string member, string signature, BodyWriter write)
    {
        var writer = client.Connection.GetMessageWriter();
        try
        {
            writer.WriteSignalHeader(null, BusContract.ObjectPath, BusContract.Interface, member, signature);
            write(ref writer);
            client.Connection.TrySendMessage(writer.CreateMessage());
        }
        finally
        {
            writer.Dispose();
        }
    }

    /// <summary>Subscribes to a Manager signal; <paramref name="read"/> runs while the message is valid.</summary>
    public static IDisposable WatchManager<T>(this BusClient client, string member, MessageValueReader<T> read, Action<T> handler) =>
        client.Connection.AddMatchAsync(new MatchRule { Type = MessageType.Signal, Path = BusContract.ObjectPath, Interface = BusContract.Interface, Member = member },
            read, n =>
            {
                if (n.HasValue)
                    handler(n.Value);
            }, emitOnCapturedContext: false, ObserverFlags.None, null).AsTask().GetAwaiter().GetResult();
}
