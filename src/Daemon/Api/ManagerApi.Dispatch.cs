using System.Text;
using BFMig.Bus;
using BFMig.Daemon.Logging;
using Tmds.DBus.Protocol;

namespace BFMig.Daemon.Api;

/// <summary>How method calls reach <see cref="ManagerApi"/>'s methods on a Tmds.DBus.Protocol connection.</summary>
public sealed partial class ManagerApi : IPathMethodHandler
{
    private Dictionary<string, Method>? _methods;

    private delegate Task<BodyWriter?> MethodBody(CallerCredentials caller, string[] arguments);

    private sealed record Method(string Name, string InSignature, string OutSignature, CallerAccess Access, MethodBody Body);

    /// <summary>
    /// The Manager interface's element of the checked-in org.bfmig.BFMig1.xml (embedded), the
    /// answer to Introspect: the contract file is the introspection data, so they cannot differ.
    /// </summary>
    private static readonly ReadOnlyMemory<byte> InterfaceXml = LoadInterfaceXml();

    string IPathMethodHandler.Path => ObjectPath;

    bool IPathMethodHandler.HandlesChildPaths => false;

    /// <summary>
    /// Runs on the connection's receive loop, which reads no other message until this returns: it
    /// only checks the call and reads its arguments (the request is valid only now), then answers
    /// from the thread pool, where asking the bus for the caller's credentials can wait for the
    /// loop to read the bus's reply.
    /// </summary>
    ValueTask IPathMethodHandler.HandleMethodAsync(MethodContext context)
    {
        if (context.IsDBusIntrospectRequest)
        {
            context.ReplyIntrospectXml([InterfaceXml]);
            return default;
        }
        Message request = context.Request;
        if (request.InterfaceAsString is { } iface && iface != InterfaceName
            || request.MemberAsString is not { } member || !Methods.TryGetValue(member, out Method? method))
        {
            context.ReplyUnknownMethodError();
            return default;
        }
        string signature = request.SignatureAsString ?? "";
        if (signature != method.InSignature)
        {
            context.ReplyError(BusErrorNames.InvalidArgs, $"{method.Name} takes ({method.InSignature}), not ({signature})");
            return default;
        }
        var arguments = new string[signature.Length];
        Reader reader = request.GetBodyReader();
        for (int i = 0; i < arguments.Length; i++)
            arguments[i] = reader.ReadString();
        string sender = request.SenderAsString ?? "";
        context.DisposesAsynchronously = true;
        _ = Task.Run(() => AnswerAsync(context, method, sender, arguments));
        return default;
    }

    /// <summary>Built on first use (a primary constructor's initializers cannot call instance methods); a race builds the same table twice.</summary>
    private Dictionary<string, Method> Methods => _methods ??= CreateMethods().ToDictionary(m => m.Name, StringComparer.Ordinal);

    /// <summary>Checks the caller, runs the method and sends exactly one reply (or error), then releases the call.</summary>
    private async Task AnswerAsync(MethodContext context, Method method, string sender, string[] arguments)
    {
        try
        {
            var caller = await WhoCalledAsync(context, method.Name, sender).ConfigureAwait(false);
            Require(caller, method.Name, method.Access);
            var write = await method.Body(caller, arguments).ConfigureAwait(false);
            var writer = context.CreateReplyWriter(method.OutSignature);
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
        catch (RefusedException e)
        {
            TryReplyError(context, method.Name, e.ErrorName, e.Message);
        }
        catch (DaemonApiException e)
        {
            DaemonLog.MethodFailed(logger, method.Name, e.Message);
            TryReplyError(context, method.Name, e.ErrorName, e.Message);
        }
        catch (Exception e)
        {
            DaemonLog.MethodFailed(logger, method.Name, e.ToString());
            TryReplyError(context, method.Name, DaemonErrors.Failed, $"{method.Name} failed: {e.Message}");
        }
        finally
        {
            context.Dispose();
        }
    }

    /// <summary>The caller's credentials; a bus that does not say in time refuses the call by name (nothing runs unidentified).</summary>
    private static async Task<CallerCredentials> WhoCalledAsync(MethodContext context, string method, string sender)
    {
        try
        {
            return await CallerCredentials.QueryAsync(context.Connection, sender).ConfigureAwait(false);
        }
        catch (TimeoutException)
        {
            throw new DaemonApiException(DaemonErrors.Failed,
                $"{method} not run: the bus did not say who called ({sender}) within {CallerCredentials.QueryTimeout.TotalSeconds:0} s (bus or daemon overloaded); try again");
        }
    }

    private void TryReplyError(MethodContext context, string method, string name, string message)
    {
        try
        {
            if (!context.ReplySent)
                context.ReplyError(name, message);
        }
        catch (Exception e) when (e is DBusExceptionBase or ObjectDisposedException or InvalidOperationException)
        {
            // The connection went away: the caller sees its own disconnect or timeout.
            DaemonLog.MethodFailed(logger, method, $"cannot send the reply: {e.Message}");
        }
    }

    private static ReadOnlyMemory<byte> LoadInterfaceXml()
    {
        using var stream = typeof(ManagerApi).Assembly.GetManifestResourceStream("org.bfmig.BFMig1.xml")
            ?? throw new InvalidOperationException("org.bfmig.BFMig1.xml is not embedded in bfmigd");
        using var text = new StreamReader(stream, Encoding.UTF8);
        string xml = text.ReadToEnd();
        int start = xml.IndexOf("<interface ", StringComparison.Ordinal);
        const string End = "</interface>";
        int end = xml.IndexOf(End, start, StringComparison.Ordinal) + End.Length;
        return Encoding.UTF8.GetBytes(xml[start..end] + "\n");
    }
}
