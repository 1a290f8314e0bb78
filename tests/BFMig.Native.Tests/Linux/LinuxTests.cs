using System.Diagnostics;
using System.Net;
using System.Net.Sockets;
using System.Runtime.InteropServices;
using BFMig.Native.Linux;
using Microsoft.Win32.SafeHandles;

namespace BFMig.Native.Tests.Linux;

public sealed class UnixUsersTests
{
    private static string[] Getent(string database, string key)
    {
        var (code, stdout, _) = DBus.PrivateBusFixture.Run("getent", database, key);
        return code == 0 ? stdout.Trim().Split(':') : [];
    }

    [Fact]
    public void Users_and_groups_match_getent()
    {
        UnixUser? root = UnixUsers.GetUser("root");
        Assert.NotNull(root);
        Assert.Equal(new UnixUser("root", 0, 0, "/root", Getent("passwd", "root")[6]), root);

        // The QEMU user on Debian; compare with getent rather than hard-coding this machine's ids.
        string[] qemu = Getent("passwd", "libvirt-qemu");
        Assert.NotEmpty(qemu);
        UnixUser? user = UnixUsers.GetUser("libvirt-qemu");
        Assert.NotNull(user);
        Assert.Equal(uint.Parse(qemu[2]), user.Uid);
        Assert.Equal(uint.Parse(qemu[3]), user.Gid);

        string[] kvm = Getent("group", "kvm");
        UnixGroup? group = UnixUsers.GetGroup("kvm");
        Assert.NotNull(group);
        Assert.Equal(uint.Parse(kvm[2]), group.Gid);
        Assert.Equal(kvm[3].Split(',', StringSplitOptions.RemoveEmptyEntries), group.Members);

        Assert.Null(UnixUsers.GetUser("bfmig-no-such-user"));
        Assert.Null(UnixUsers.GetGroup("bfmig-no-such-group"));
        Assert.Equal(0u, UnixUsers.EffectiveUid);
    }

    [Fact]
    public void Socket_file_ownership_and_mode_change()
    {
        DirectoryInfo dir = Directory.CreateTempSubdirectory("bfmig-own-");
        try
        {
            string path = Path.Combine(dir.FullName, "guest.mig");
            using var listener = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
            listener.Bind(new UnixDomainSocketEndPoint(path));
            UnixUser qemu = UnixUsers.GetUser("libvirt-qemu")!;
            UnixGroup kvm = UnixUsers.GetGroup("kvm")!;
            UnixUsers.ChangeOwner(path, qemu.Uid, kvm.Gid);
            UnixUsers.ChangeMode(path, UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.GroupRead | UnixFileMode.GroupWrite);
            var (code, stdout, _) = DBus.PrivateBusFixture.Run("stat", "-c", "%u %g %a %F", path);
            Assert.Equal(0, code);
            Assert.Equal($"{qemu.Uid} {kvm.Gid} 660 socket", stdout.Trim());

            var e = Assert.Throws<IOException>(() => UnixUsers.ChangeMode(Path.Combine(dir.FullName, "missing"), UnixFileMode.UserRead));
            Assert.Contains("errno 2", e.Message);
        }
        finally
        {
            dir.Delete(recursive: true);
        }
    }
}

public sealed class FdPassingTests
{
    private static (Socket Left, Socket Right, DirectoryInfo Dir) Pair()
    {
        DirectoryInfo dir = Directory.CreateTempSubdirectory("bfmig-fd-");
        var endpoint = new UnixDomainSocketEndPoint(Path.Combine(dir.FullName, "s"));
        using var listener = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        listener.Bind(endpoint);
        listener.Listen(1);
        var left = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        left.Connect(endpoint);
        return (left, listener.Accept(), dir);
    }

    [Fact]
    public void A_file_descriptor_crosses_a_unix_socket_and_reads_the_same_file()
    {
        var (left, right, dir) = Pair();
        try
        {
            string file = Path.Combine(dir.FullName, "payload");
            File.WriteAllText(file, "retained state");
            using var original = new FileStream(file, FileMode.Open, FileAccess.Read);
            using var other = new FileStream(file, FileMode.Open, FileAccess.Read);

            int sent = UnixSockets.SendWithFds(left, "fd!"u8, [(int)original.SafeFileHandle.DangerousGetHandle(), (int)other.SafeFileHandle.DangerousGetHandle()]);
            Assert.Equal(3, sent);

            var buffer = new byte[16];
            var fds = new int[4];
            var (bytes, count) = UnixSockets.ReceiveWithFds(right, buffer, fds, TimeSpan.FromSeconds(5));
            Assert.Equal("fd!", System.Text.Encoding.ASCII.GetString(buffer, 0, bytes));
            Assert.Equal(2, count);
            Assert.NotEqual((int)original.SafeFileHandle.DangerousGetHandle(), fds[0]);
            foreach (int fd in fds[..count])
            {
                using var received = new FileStream(new SafeFileHandle(fd, ownsHandle: true), FileAccess.Read);
                received.Position = 0;
                Assert.Equal("retained state", new StreamReader(received).ReadToEnd());
            }
            // Our own descriptors are still open.
            original.Position = 0;
            Assert.Equal("retained state", new StreamReader(original).ReadToEnd());
        }
        finally
        {
            left.Dispose();
            right.Dispose();
            dir.Delete(recursive: true);
        }
    }

    [Fact]
    public void More_descriptors_than_expected_is_an_error_and_waiting_times_out()
    {
        var (left, right, dir) = Pair();
        try
        {
            var e = Assert.Throws<TimeoutException>(() => UnixSockets.ReceiveWithFds(right, new byte[4], new int[1], TimeSpan.FromMilliseconds(200)));
            Assert.Contains("within", e.Message);

            using var a = File.OpenRead("/etc/hostname");
            int fd = (int)a.SafeFileHandle.DangerousGetHandle();
            UnixSockets.SendWithFds(left, "x"u8, [fd, fd, fd]);
            var truncated = Assert.Throws<IOException>(() => UnixSockets.ReceiveWithFds(right, new byte[4], new int[1], TimeSpan.FromSeconds(5)));
            Assert.Contains("more than 1 descriptors", truncated.Message);

            Assert.Throws<ArgumentException>(() => UnixSockets.SendWithFds(left, ReadOnlySpan<byte>.Empty, [fd]));
        }
        finally
        {
            left.Dispose();
            right.Dispose();
            dir.Delete(recursive: true);
        }
    }
}

/// <summary>SO_ORIGINAL_DST with a real nftables redirect, inside a private network namespace.</summary>
public sealed partial class OriginalDestinationTests(ITestOutputHelper output)
{
    private const int CloneNewNet = 0x40000000;

    [LibraryImport("libc", EntryPoint = "setns", SetLastError = true)]
    private static partial int SetNs(int fd, int nsType);

    private static void Must(string file, params string[] args)
    {
        var (code, stdout, stderr) = DBus.PrivateBusFixture.Run(file, args);
        Assert.True(code == 0, $"{file} {string.Join(' ', args)}: {stdout}{stderr}");
    }

    [Fact]
    public void Plain_socket_without_conntrack_entry_is_an_error()
    {
        // A UDP socket that never sent anything has no conntrack entry: the kernel answers ENOENT.
        using var udp = new Socket(AddressFamily.InterNetwork, SocketType.Dgram, ProtocolType.Udp);
        udp.Bind(new IPEndPoint(IPAddress.Loopback, 0));
        var e = Assert.Throws<SocketException>(() => UnixSockets.GetOriginalDestination(udp));
        Assert.Contains("SO_ORIGINAL_DST failed", e.Message);
    }

    [Fact]
    public void Redirected_connection_reports_its_original_destination()
    {
        if (!Prerequisite.Require(File.Exists("/usr/sbin/nft") && File.Exists("/usr/sbin/ip"), "nft and ip (iproute2)", output))
        {
            return;
        }
        string ns = $"bfmig-native-{Environment.ProcessId}";
        Must("ip", "netns", "add", ns);
        try
        {
            Must("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up");
            // A route towards the "peer" so the connect gets as far as the NAT output hook.
            Must("ip", "netns", "exec", ns, "ip", "addr", "add", "198.18.0.1/15", "dev", "lo");
            Must("ip", "netns", "exec", ns, "nft", "add table ip bfmig_test");
            Must("ip", "netns", "exec", ns, "nft", "add chain ip bfmig_test out { type nat hook output priority -100 ; }");
            Must("ip", "netns", "exec", ns, "nft", "add rule ip bfmig_test out ip daddr 198.18.0.2 tcp dport 49152 redirect to :7000");

            IPEndPoint? original = null;
            Exception? failure = null;
            IPEndPoint? notRedirected = null;
            // Network namespaces are per thread: a dedicated thread joins the namespace, and the
            // sockets it creates stay there whatever thread uses them later.
            var thread = new Thread(() =>
            {
                try
                {
                    using (var nsFile = File.OpenHandle($"/run/netns/{ns}"))
                    {
                        if (SetNs((int)nsFile.DangerousGetHandle(), CloneNewNet) != 0)
                        {
                            throw new IOException($"setns failed: errno {Marshal.GetLastPInvokeError()}");
                        }
                    }
                    using var listener = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
                    listener.Bind(new IPEndPoint(IPAddress.Any, 7000));
                    listener.Listen(2);
                    using var client = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
                    client.Connect(new IPEndPoint(IPAddress.Parse("198.18.0.2"), 49152));
                    using var accepted = listener.Accept();
                    original = UnixSockets.GetOriginalDestination(accepted);

                    using var direct = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
                    direct.Connect(new IPEndPoint(IPAddress.Loopback, 7000));
                    using var acceptedDirect = listener.Accept();
                    notRedirected = UnixSockets.GetOriginalDestination(acceptedDirect);
                }
                catch (Exception e)
                {
                    failure = e;
                }
            });
            thread.Start();
            Assert.True(thread.Join(TimeSpan.FromSeconds(20)));
            Assert.Null(failure);
            Assert.Equal(new IPEndPoint(IPAddress.Parse("198.18.0.2"), 49152), original);
            // A tracked connection that was not rewritten reports where it really went.
            Assert.Equal(new IPEndPoint(IPAddress.Loopback, 7000), notRedirected);
        }
        finally
        {
            DBus.PrivateBusFixture.Run("ip", "netns", "del", ns);
        }
    }
}

public sealed class DurableFileTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("bfmig-durable-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    [Fact]
    public void WriteAtomically_replaces_by_rename_and_leaves_no_temporary_file()
    {
        string path = Path.Combine(_dir, "state.json");
        DurableFile.WriteAtomically(path, "old"u8);
        ulong before = Inode(path);

        DurableFile.WriteAtomically(path, "new content"u8);

        Assert.Equal("new content", File.ReadAllText(path));
        // A rename gives the path a new inode; an in-place rewrite (the crash-unsafe way) would keep it.
        Assert.NotEqual(before, Inode(path));
        Assert.Equal(["state.json"], Directory.GetFiles(_dir).Select(Path.GetFileName));
    }

    [Fact]
    public void Replace_into_a_missing_directory_fails_and_keeps_the_source()
    {
        string source = Path.Combine(_dir, "map.tmp");
        File.WriteAllText(source, "x");
        Assert.ThrowsAny<IOException>(() => DurableFile.Replace(source, Path.Combine(_dir, "gone", "map")));
        Assert.True(File.Exists(source));
    }

    private static ulong Inode(string path)
    {
        var (code, stdout, _) = DBus.PrivateBusFixture.Run("stat", "-c", "%i", path);
        Assert.Equal(0, code);
        return ulong.Parse(stdout.Trim());
    }
}
