using System.ComponentModel;
using System.IO.Pipes;
using BFMig.Native.Processes;
using Xunit;

namespace BFMig.Native.Tests;

public sealed class ChildProcessTests
{
    private static readonly TimeSpan Timeout = TimeSpan.FromSeconds(20);

    [Fact]
    public async Task A_mapped_descriptor_reaches_the_child_in_the_slot_asked_for()
    {
        using var pipe = new AnonymousPipeServerStream(PipeDirection.In);
        var writeEnd = (int)pipe.ClientSafePipeHandle.DangerousGetHandle();
        var child = ChildProcess.Start("/bin/sh", ["-c", "echo through-fd-3 >&3"], [(writeEnd, 3)]);
        pipe.DisposeLocalCopyOfClientHandle();
        using var reader = new StreamReader(pipe);
        Assert.Equal("through-fd-3", await reader.ReadLineAsync().WaitAsync(Timeout));
        Assert.Equal(0, await child.Exited.WaitAsync(Timeout));
    }

    [Fact]
    public async Task Descriptors_that_are_not_mapped_stay_with_us()
    {
        using var pipe = new AnonymousPipeServerStream(PipeDirection.In);
        var writeEnd = (int)pipe.ClientSafePipeHandle.DangerousGetHandle();
        using var unrelated = File.OpenRead("/etc/hostname");
        var child = ChildProcess.Start("/bin/sh", ["-c", "ls /proc/self/fd >&3"], [(writeEnd, 3)]);
        pipe.DisposeLocalCopyOfClientHandle();
        using var reader = new StreamReader(pipe);
        var fds = (await reader.ReadToEndAsync().WaitAsync(Timeout)).Split('\n', StringSplitOptions.RemoveEmptyEntries);
        await child.Exited.WaitAsync(Timeout);
        // 0-2, our fd 3, and the one ls itself opened to read the directory (the highest).
        Assert.Equal(["0", "1", "2", "3", "4"], fds.Order());
    }

    [Fact]
    public async Task The_exit_code_and_a_killing_signal_are_reported()
    {
        Assert.Equal(7, await ChildProcess.Start("/bin/sh", ["-c", "exit 7"], []).Exited.WaitAsync(Timeout));

        var sleeper = ChildProcess.Start("/bin/sleep", ["30"], []);
        sleeper.Signal(9);
        Assert.Equal(128 + 9, await sleeper.Exited.WaitAsync(Timeout));
        sleeper.Signal(9); // already gone: not an error
    }

    [Fact]
    public async Task The_environment_given_is_the_whole_environment()
    {
        using var pipe = new AnonymousPipeServerStream(PipeDirection.In);
        var writeEnd = (int)pipe.ClientSafePipeHandle.DangerousGetHandle();
        var child = ChildProcess.Start("/usr/bin/env", [], [(writeEnd, 1)], new Dictionary<string, string> { ["ONLY"] = "this" });
        pipe.DisposeLocalCopyOfClientHandle();
        using var reader = new StreamReader(pipe);
        Assert.Equal("ONLY=this", (await reader.ReadToEndAsync().WaitAsync(Timeout)).Trim());
        Assert.Equal(0, await child.Exited.WaitAsync(Timeout));
    }

    [Fact]
    public void A_missing_program_is_a_clear_error()
    {
        var e = Assert.Throws<Win32Exception>(() => ChildProcess.Start("/nonexistent/bfmig-transfer", [], []));
        Assert.Contains("/nonexistent/bfmig-transfer", e.Message);
    }

    [Fact]
    public void Crossed_mappings_are_refused_before_anything_starts()
    {
        Assert.Throws<ArgumentException>(() => ChildProcess.Start("/bin/true", [], [(7, 8), (8, 7)]));
    }
}
