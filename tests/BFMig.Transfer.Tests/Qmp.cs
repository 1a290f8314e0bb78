using System.Diagnostics;
using System.Net.Sockets;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;

namespace BFMig.Transfer.Tests;

/// <summary>A QEMU process (TCG) with a minimal QMP client; killed at dispose.</summary>
internal sealed class QemuProcess : IDisposable
{
    private readonly Process _process;
    private readonly StreamReader _reader;
    private readonly StreamWriter _writer;
    private readonly Socket _socket;

    public QemuProcess(string binary, IEnumerable<string> dataDirs, string workDir, string name, IEnumerable<string> extra)
    {
        string qmp = Path.Combine(workDir, name + ".qmp");
        var psi = new ProcessStartInfo(binary) { RedirectStandardInput = true, RedirectStandardOutput = true, RedirectStandardError = true };
        foreach (var a in new[] { "-machine", "pc", "-accel", "tcg", "-m", "32", "-nographic", "-nodefaults", "-qmp", $"unix:{qmp},server=on,wait=off" })
            psi.ArgumentList.Add(a);
        foreach (var d in dataDirs) { psi.ArgumentList.Add("-L"); psi.ArgumentList.Add(d); }
        foreach (var a in extra) psi.ArgumentList.Add(a);
        _process = Process.Start(psi)!;
        _process.StandardOutput.BaseStream.CopyToAsync(Stream.Null);
        _process.StandardError.BaseStream.CopyToAsync(Stream.Null);
        _socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        var deadline = DateTime.UtcNow.AddSeconds(20);
        while (true)
        {
            try
            {
                _socket.Connect(new UnixDomainSocketEndPoint(qmp));
                break;
            }
            catch (SocketException) when (DateTime.UtcNow < deadline && !_process.HasExited)
            {
                Thread.Sleep(50);
            }
        }
        var stream = new NetworkStream(_socket);
        _reader = new StreamReader(stream, Encoding.UTF8);
        _writer = new StreamWriter(stream, new UTF8Encoding(false)) { AutoFlush = true, NewLine = "\n" };
        _reader.ReadLine();
        Execute("qmp_capabilities");
    }

    public JsonNode? Execute(string command, JsonObject? args = null)
    {
        var msg = new JsonObject { ["execute"] = command };
        if (args is not null) msg["arguments"] = args;
        _writer.WriteLine(msg.ToJsonString());
        while (true)
        {
            var line = _reader.ReadLine() ?? throw new InvalidOperationException($"QMP closed during {command}");
            var node = JsonNode.Parse(line)!;
            if (node["error"] is { } e) throw new InvalidOperationException($"{command}: {e.ToJsonString()}");
            if (node["return"] is { } r) return r;
        }
    }

    /// <summary>Polls query-migrate until it finishes; returns the final status object.</summary>
    public JsonNode WaitForMigration(TimeSpan timeout)
    {
        var deadline = DateTime.UtcNow + timeout;
        while (DateTime.UtcNow < deadline)
        {
            var st = Execute("query-migrate")!;
            string? status = st["status"]?.GetValue<string>();
            if (status is "completed" or "failed" or "cancelled") return st;
            Thread.Sleep(100);
        }
        throw new TimeoutException("migration did not finish");
    }

    public byte[] DumpMemory(string path, long size)
    {
        Execute("pmemsave", new JsonObject { ["val"] = 0, ["size"] = size, ["filename"] = path });
        return File.ReadAllBytes(path);
    }

    public void Dispose()
    {
        try { _process.Kill(); _process.WaitForExit(5000); } catch (InvalidOperationException) { }
        _socket.Dispose();
        _process.Dispose();
    }
}

/// <summary>Runs the bfmig-transfer helper built next to the tests.</summary>
internal sealed class Helper : IDisposable
{
    private readonly Process _process;
    private readonly StringBuilder _stderr = new();

    public Helper(params string[] args)
    {
        var psi = new ProcessStartInfo(Path.Combine(AppContext.BaseDirectory, "bfmig-transfer")) { RedirectStandardError = true, RedirectStandardOutput = true };
        foreach (var a in args) psi.ArgumentList.Add(a);
        _process = Process.Start(psi)!;
        _process.ErrorDataReceived += (_, e) => { if (e.Data is not null) lock (_stderr) _stderr.AppendLine(e.Data); };
        _process.BeginErrorReadLine();
        _process.StandardOutput.BaseStream.CopyToAsync(Stream.Null);
    }

    public string Stderr { get { lock (_stderr) return _stderr.ToString(); } }

    /// <summary>Waits for exit; returns the exit code (kills and fails on timeout).</summary>
    public int Wait(TimeSpan timeout)
    {
        if (!_process.WaitForExit(timeout))
        {
            _process.Kill();
            Assert.Fail($"helper did not exit within {timeout}; stderr: {Stderr}");
        }
        _process.WaitForExit();
        return _process.ExitCode;
    }

    public void Dispose()
    {
        try { if (!_process.HasExited) _process.Kill(); } catch (InvalidOperationException) { }
        _process.Dispose();
    }

    public static JsonNode ReadStats(string path) => JsonNode.Parse(File.ReadAllText(path))!;

    public static void WaitForFile(string path, TimeSpan timeout)
    {
        var deadline = DateTime.UtcNow + timeout;
        while (!File.Exists(path))
        {
            if (DateTime.UtcNow > deadline) Assert.Fail($"{path} did not appear");
            Thread.Sleep(20);
        }
    }
}
