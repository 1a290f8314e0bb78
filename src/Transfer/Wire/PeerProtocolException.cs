namespace BFMig.Transfer.Wire;

/// <summary>
/// The peer stream is unusable (malformed frame, failed authentication, stores out of step, peer
/// aborted). The migration fails and the guest stays on the source; retrying starts a new
/// stream, which sends everything if the stores no longer agree.
/// </summary>
public class PeerProtocolException : Exception
{
    public PeerProtocolException(string message) : base(message) { }
    public PeerProtocolException(string message, Exception inner) : base(message, inner) { }
    public PeerProtocolException() { }
}

/// <summary>Authentication of the peer failed (wrong key, wrong certificate, tampered hello).</summary>
public sealed class PeerAuthenticationException : PeerProtocolException
{
    public PeerAuthenticationException(string message) : base(message) { }
    public PeerAuthenticationException(string message, Exception inner) : base(message, inner) { }
    public PeerAuthenticationException() { }
}

/// <summary>The peer sent an Abort frame.</summary>
public sealed class PeerAbortedException : PeerProtocolException
{
    public PeerAbortedException(string reason) : base($"peer aborted: {reason}") => Reason = reason;
    public PeerAbortedException() { Reason = ""; }
    public PeerAbortedException(string message, Exception inner) : base(message, inner) { Reason = message; }

    /// <summary>The reason the peer gave.</summary>
    public string Reason { get; }
}

/// <summary>
/// This host's store proved out of step with the peer's (an elided or referenced page that is not
/// what the index says, a digest that differs at the end): something other than a trip changed
/// it, so no journal can say which pages to trust, and the whole store goes in doubt.
/// </summary>
public sealed class StoreOutOfStepException : PeerProtocolException
{
    /// <summary>This host found a retained page that is not what its index says (rather than indexes that differ).</summary>
    public bool PagesDiffer { get; init; }

    public StoreOutOfStepException(string message) : base(message) { }
    public StoreOutOfStepException(string message, Exception inner) : base(message, inner) { }
    public StoreOutOfStepException() { }
}
