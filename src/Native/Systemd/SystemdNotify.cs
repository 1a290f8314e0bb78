using System.Runtime.InteropServices;

namespace BFMig.Native.Systemd;

/// <summary>sd_notify for services with Type=notify. Each call is a no-op (returns false) outside systemd.</summary>
public static class SystemdNotify
{
    /// <summary>READY=1: startup finished.</summary>
    public static bool Ready() => Notify("READY=1");

    /// <summary>STATUS=...: one line shown by systemctl status.</summary>
    public static bool Status(string status) => Notify("STATUS=" + status.ReplaceLineEndings(" "));

    /// <summary>STOPPING=1: shutdown started.</summary>
    public static bool Stopping() => Notify("STOPPING=1");

    /// <summary>
    /// Sends raw notify state (newline-separated assignments). False when NOTIFY_SOCKET is unset;
    /// throws when it is set but the message cannot be delivered.
    /// </summary>
    public static bool Notify(string state)
    {
        int rc = Interop.SdJournal.Notify(state);
        if (rc < 0)
        {
            throw new IOException($"sd_notify({state.Split('\n')[0]}...) failed: {Marshal.GetPInvokeErrorMessage(-rc)} (errno {-rc})");
        }
        return rc > 0;
    }
}
