using System.Net.Sockets;
using System.Text;
using BFMig.Native.Systemd;

namespace BFMig.Native.Tests.Systemd;

public sealed class SystemdJournalTests(ITestOutputHelper output)
{
    [Fact]
    public void Entry_fields_are_name_equals_value_in_order_with_code_location()
    {
        var fields = SystemdJournal.BuildFields(JournalPriority.Warning, "guest left\nsecond line", "bfmigd",
            [KeyValuePair.Create("GUEST_UUID", "0f3c"), KeyValuePair.Create("BYTES_SAVED", "12345")], "/src/a.cs", 42, "Run");
        string[] text = fields.Select(f => Encoding.UTF8.GetString(f)).ToArray();
        Assert.Equal(
            ["MESSAGE=guest left\nsecond line", "PRIORITY=4", "SYSLOG_IDENTIFIER=bfmigd", "CODE_FILE=/src/a.cs", "CODE_LINE=42",
             "CODE_FUNC=Run", "GUEST_UUID=0f3c", "BYTES_SAVED=12345"],
            text);
    }

    [Theory]
    [InlineData("lower")]
    [InlineData("_TRUSTED")]
    [InlineData("1ST")]
    [InlineData("A-B")]
    [InlineData("")]
    public void Invalid_custom_field_names_are_refused(string name)
    {
        var e = Assert.Throws<ArgumentException>(() => SystemdJournal.Send(JournalPriority.Informational, "x", null, [KeyValuePair.Create(name, "v")]));
        Assert.Contains("not a valid journal field name", e.Message);
    }

    [Fact]
    public void Send_succeeds_with_journald_and_is_dropped_silently_without_it()
    {
        int rc = SystemdJournal.Send(JournalPriority.Informational, "bfmig native test entry", "bfmig-native-tests",
            [KeyValuePair.Create("BFMIG_TEST", "1")]);
        // Both cases return 0: libsystemd's journal-send.c treats ENOENT from sendmsg() as
        // "fail silently if the journal is not available". IsAvailable is how callers tell.
        Assert.Equal(0, rc);
        output.WriteLine(SystemdJournal.IsAvailable
            ? "journald is running: entry sent"
            : "journald is not running here: sd_journal_sendv returned 0 and dropped the entry, as journal-send.c documents");
    }
}

/// <summary>sd_notify against a datagram socket we own, the way systemd receives READY=1.</summary>
[Collection(EnvironmentCollection.Name)]
public sealed class SystemdNotifyTests
{
    [Fact]
    public void Ready_status_and_stopping_reach_the_notify_socket()
    {
        DirectoryInfo dir = Directory.CreateTempSubdirectory("bfmig-notify-");
        string path = Path.Combine(dir.FullName, "notify");
        using var socket = new Socket(AddressFamily.Unix, SocketType.Dgram, ProtocolType.Unspecified);
        socket.Bind(new UnixDomainSocketEndPoint(path));
        socket.ReceiveTimeout = 5000;
        Assert.Equal(0, Interop.Libc.SetEnv("NOTIFY_SOCKET", path, 1));
        try
        {
            Assert.True(SystemdNotify.Ready());
            Assert.True(SystemdNotify.Status("3 guests, 1 away\non hostB"));
            Assert.True(SystemdNotify.Stopping());
            var buffer = new byte[4096];
            string Next() => Encoding.UTF8.GetString(buffer, 0, socket.Receive(buffer));
            Assert.Equal("READY=1", Next());
            Assert.Equal("STATUS=3 guests, 1 away on hostB", Next());
            Assert.Equal("STOPPING=1", Next());

            // Socket gone: the message cannot be delivered, which must not pass silently.
            socket.Close();
            File.Delete(path);
            Assert.Throws<IOException>(() => SystemdNotify.Ready());
        }
        finally
        {
            Interop.Libc.UnsetEnv("NOTIFY_SOCKET");
            dir.Delete(recursive: true);
        }
        Assert.False(SystemdNotify.Ready());
    }
}

[CollectionDefinition(Name, DisableParallelization = true)]
public sealed class EnvironmentCollection
{
    public const string Name = "process environment";
}
