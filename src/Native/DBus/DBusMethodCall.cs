namespace BFMig.Native.DBus;

/// <summary>
/// An incoming method call, valid during the handler only (use <see cref="Defer"/> to answer later).
/// Reply exactly once with <see cref="Reply"/> or <see cref="ReplyError"/>, or throw a
/// <see cref="DBusException"/> to answer with its error name.
/// </summary>
public sealed unsafe class DBusMethodCall
{
    private readonly DBusConnection _connection;
    private nint _message;

    internal DBusMethodCall(DBusConnection connection, nint message, DBusMethodDefinition method)
    {
        _connection = connection;
        _message = message;
        Method = method;
        Sender = Interop.SdBus.PtrToString(Interop.SdBus.sd_bus_message_get_sender(message)) ?? "";
        Path = Interop.SdBus.PtrToString(Interop.SdBus.sd_bus_message_get_path(message)) ?? "";
    }

    public DBusMethodDefinition Method { get; }

    /// <summary>The caller's unique bus name.</summary>
    public string Sender { get; }

    public string Path { get; }

    internal bool Answered { get; private set; }

    internal bool Deferred { get; private set; }

    /// <summary>Reads the call's arguments (in order, once).</summary>
    public DBusMessageReader Reader => new(Live());

    private nint Live() => _message != 0 ? _message : throw new InvalidOperationException("the method call is no longer valid (handler returned)");

    /// <summary>
    /// The caller's effective uid as the bus daemon saw it when the caller connected
    /// (GetConnectionCredentials' UnixUserID, taken from the socket's SO_PEERCRED, not from /proc).
    /// </summary>
    public uint GetSenderUid()
    {
        nint creds;
        Interop.SdBus.Check(Interop.SdBus.sd_bus_query_sender_creds(Live(), Interop.SdBus.CredsEuid, &creds), "query sender credentials");
        try
        {
            uint uid;
            Interop.SdBus.Check(Interop.SdBus.sd_bus_creds_get_euid(creds, &uid), "read sender euid");
            return uid;
        }
        finally
        {
            Interop.SdBus.sd_bus_creds_unref(creds);
        }
    }

    /// <summary>
    /// The caller's uid and groups as the bus daemon recorded them when the caller connected
    /// (<c>org.freedesktop.DBus.GetConnectionCredentials</c>: UnixUserID from SO_PEERCRED,
    /// UnixGroupIDs from SO_PEERGROUPS, primary group included). Never read from /proc, where a
    /// pid may already belong to another process. Groups are empty when the bus cannot tell them.
    /// </summary>
    public DBusCallerCredentials GetSenderCredentials() =>
        _connection.Call("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus", "GetConnectionCredentials",
            w => w.WriteString(Sender), DBusCallerCredentials.Read, CredentialsTimeout);

    /// <summary>The bus daemon answers from memory; a bus that takes longer is broken and the call is refused.</summary>
    private static readonly TimeSpan CredentialsTimeout = TimeSpan.FromSeconds(5);

    /// <summary>Sends the method return; <paramref name="write"/> appends the out arguments.</summary>
    public void Reply(Action<DBusMessageWriter>? write = null)
    {
        MarkAnswered();
        SendReply(_connection, Live(), write);
    }

    /// <summary>Sends an error reply.</summary>
    public void ReplyError(string errorName, string message)
    {
        MarkAnswered();
        SendError(Live(), errorName, message);
    }

    /// <summary>Keeps the call alive to be answered later, from any thread.</summary>
    public DBusDeferredReply Defer()
    {
        MarkAnswered();
        Deferred = true;
        return new DBusDeferredReply(_connection, Interop.SdBus.sd_bus_message_ref(Live()));
    }

    private void MarkAnswered()
    {
        if (Answered)
        {
            throw new InvalidOperationException($"method call {Method.Name} was already answered");
        }
        Answered = true;
    }

    internal void Invalidate() => _message = 0;

    internal static void SendReply(DBusConnection connection, nint call, Action<DBusMessageWriter>? write)
    {
        nint reply;
        Interop.SdBus.Check(Interop.SdBus.sd_bus_message_new_method_return(call, &reply), "new method return");
        try
        {
            try
            {
                write?.Invoke(new DBusMessageWriter(reply));
            }
            catch (Exception e)
            {
                // The call counts as answered already; without an error reply here the caller
                // would wait for its whole timeout and then see a misleading NoReply.
                SendError(call, DBusErrorNames.Failed, $"building the reply failed: {e.Message}");
                connection.Wake();
                throw;
            }
            Interop.SdBus.Check(Interop.SdBus.sd_bus_send(0, reply, null), "send reply");
        }
        finally
        {
            Interop.SdBus.sd_bus_message_unref(reply);
        }
        connection.Wake();
    }

    internal static void SendError(nint call, string errorName, string message)
    {
        Interop.SdBus.SdBusError error = default;
        try
        {
            Interop.SdBus.sd_bus_error_set(&error, errorName, message);
            Interop.SdBus.Check(Interop.SdBus.sd_bus_reply_method_error(call, &error), "send error reply");
        }
        finally
        {
            Interop.SdBus.sd_bus_error_free(&error);
        }
    }
}

/// <summary>Who sent a method call, as the bus daemon saw it (see <see cref="DBusMethodCall.GetSenderCredentials"/>).</summary>
public sealed record DBusCallerCredentials(uint Uid, IReadOnlyList<uint> GroupIds)
{
    /// <summary>True when the caller is in group <paramref name="gid"/> (primary or supplementary).</summary>
    public bool InGroup(uint gid) => GroupIds.Contains(gid);

    internal static DBusCallerCredentials Read(DBusMessageReader r)
    {
        uint? uid = null;
        var groups = new List<uint>();
        if (r.EnterArray("{sv}"))
        {
            while (r.EnterDictEntry("sv"))
            {
                switch (r.ReadString())
                {
                    case "UnixUserID":
                        r.EnterVariant("u");
                        uid = r.ReadUInt32();
                        r.ExitContainer();
                        break;
                    case "UnixGroupIDs":
                        r.EnterVariant("au");
                        if (r.EnterArray("u"))
                        {
                            while (!r.AtEnd)
                                groups.Add(r.ReadUInt32());
                            r.ExitContainer();
                        }
                        r.ExitContainer();
                        break;
                    default:
                        r.Skip("v");
                        break;
                }
                r.ExitContainer();
            }
            r.ExitContainer();
        }
        return new DBusCallerCredentials(uid ?? throw new DBusException(DBusErrorNames.Failed, "the bus did not say which uid the caller has"), groups);
    }
}

/// <summary>A method call kept to be answered later (from any thread), exactly once.</summary>
public sealed class DBusDeferredReply
{
    private readonly DBusConnection _connection;
    private nint _call;

    internal DBusDeferredReply(DBusConnection connection, nint call)
    {
        _connection = connection;
        _call = call;
    }

    public void Reply(Action<DBusMessageWriter>? write = null) =>
        Complete(call => DBusMethodCall.SendReply(_connection, call, write));

    public void ReplyError(string errorName, string message) =>
        Complete(call => DBusMethodCall.SendError(call, errorName, message));

    private void Complete(Action<nint> send)
    {
        nint call = Interlocked.Exchange(ref _call, 0);
        if (call == 0)
        {
            throw new InvalidOperationException("the deferred call was already answered");
        }
        _connection.RunOnBus(() =>
        {
            try
            {
                _connection.ThrowIfClosed();
                send(call);
            }
            finally
            {
                // The message keeps the bus object alive, so this is safe even after Dispose.
                Interop.SdBus.sd_bus_message_unref(call);
            }
        });
    }
}

/// <summary>A received signal, valid during the subscription callback only.</summary>
public readonly struct DBusSignal
{
    internal unsafe DBusSignal(nint message)
    {
        Reader = new DBusMessageReader(message);
        Sender = Interop.SdBus.PtrToString(Interop.SdBus.sd_bus_message_get_sender(message)) ?? "";
        Path = Interop.SdBus.PtrToString(Interop.SdBus.sd_bus_message_get_path(message)) ?? "";
        Interface = Interop.SdBus.PtrToString(Interop.SdBus.sd_bus_message_get_interface(message)) ?? "";
        Member = Interop.SdBus.PtrToString(Interop.SdBus.sd_bus_message_get_member(message)) ?? "";
    }

    public DBusMessageReader Reader { get; }

    public string Sender { get; }

    public string Path { get; }

    public string Interface { get; }

    public string Member { get; }
}
