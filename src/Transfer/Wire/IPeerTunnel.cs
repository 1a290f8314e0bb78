namespace BFMig.Transfer.Wire;

/// <summary>An upstream over the peer connection whose forward direction ends with an EOF the peer sees (<see cref="TunnelBridge"/>).</summary>
public interface IPeerTunnel
{
    /// <summary>Sends EOF to the peer once everything written before it has gone.</summary>
    ValueTask ShutdownWriteAsync(CancellationToken ct = default);
}
