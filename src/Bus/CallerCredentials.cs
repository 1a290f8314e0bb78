using Tmds.DBus.Protocol;

namespace BFMig.Bus;

/// <summary>
/// Who sent a method call, as the bus daemon recorded it when the caller connected
/// (<c>org.freedesktop.DBus.GetConnectionCredentials</c>: UnixUserID from SO_PEERCRED,
/// UnixGroupIDs from SO_PEERGROUPS, primary group included). Nothing the caller sends is
/// trusted, nothing is read from /proc (a pid may already belong to another process), and
/// nothing is cached: each call asks again for the sender's unique name, which the bus never
/// gives to a second connection. Groups are empty when the bus cannot tell them.
/// </summary>
public sealed record CallerCredentials(uint Uid, IReadOnlyList<uint> GroupIds)
{
    private const string Bus = "org.freedesktop.DBus";

    /// <summary>The bus daemon answers from memory; a bus that takes longer is broken and the call is refused.</summary>
    public static readonly TimeSpan QueryTimeout = TimeSpan.FromSeconds(5);

    /// <summary>True when the caller is in group <paramref name="gid"/> (primary or supplementary).</summary>
    public bool InGroup(uint gid) => GroupIds.Contains(gid);

    /// <summary>Asks the bus for the credentials of <paramref name="sender"/> (a unique name such as ":1.42").</summary>
    public static async Task<CallerCredentials> QueryAsync(DBusConnection connection, string sender)
    {
        MessageBuffer call = BusClient.CreateCall(connection, Bus, "/org/freedesktop/DBus", Bus, "GetConnectionCredentials", "s",
            (ref MessageWriter w) => w.WriteString(sender));
        return await connection.CallMethodAsync(call, static (m, _) => Read(m), null).WaitAsync(QueryTimeout).ConfigureAwait(false);
    }

    private static CallerCredentials Read(Message message)
    {
        Dictionary<string, VariantValue> values = message.GetBodyReader().ReadDictionaryOfStringToVariantValue();
        if (!values.TryGetValue("UnixUserID", out VariantValue uid) || uid.Type != VariantValueType.UInt32)
            throw new DBusUnexpectedValueException("the bus did not say which uid the caller has");
        uint[] groups = values.TryGetValue("UnixGroupIDs", out VariantValue g) && g.Type == VariantValueType.Array ? g.GetArray<uint>() : [];
        return new CallerCredentials(uid.GetUInt32(), groups);
    }
}
