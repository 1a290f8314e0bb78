using System.Buffers.Binary;
using System.Security.Cryptography;

namespace BFMig.Transfer.Wire;

/// <summary>
/// The two keys that protect the frames after a pre-shared-key handshake, one per direction, so
/// that no (key, nonce) pair is ever used twice and a frame of one direction cannot be reflected
/// into the other.
/// </summary>
/// <param name="SenderToReceiver">AES-256 key of the frames the sender (initiator) writes.</param>
/// <param name="ReceiverToSender">AES-256 key of the frames the receiver writes.</param>
public sealed record FrameKeys(byte[] SenderToReceiver, byte[] ReceiverToSender)
{
    private static ReadOnlySpan<byte> SenderToReceiverLabel => "bfmig v2 frames sender to receiver"u8;
    private static ReadOnlySpan<byte> ReceiverToSenderLabel => "bfmig v2 frames receiver to sender"u8;

    /// <summary>
    /// HKDF-SHA256 with the pre-shared key as input keying material and the hash of the hello
    /// transcript (both hellos, so both fresh nonces and every field either side sent) as salt:
    /// every connection gets its own keys even if one side's nonce repeats, and a tampered hello
    /// gives the two sides different keys.
    /// </summary>
    public static FrameKeys Derive(ReadOnlySpan<byte> preSharedKey, ReadOnlySpan<byte> transcript)
    {
        Span<byte> salt = stackalloc byte[32];
        SHA256.HashData(transcript, salt);
        Span<byte> prk = stackalloc byte[32];
        HKDF.Extract(HashAlgorithmName.SHA256, preSharedKey, salt, prk);
        var s2r = new byte[32];
        var r2s = new byte[32];
        HKDF.Expand(HashAlgorithmName.SHA256, prk, s2r, SenderToReceiverLabel);
        HKDF.Expand(HashAlgorithmName.SHA256, prk, r2s, ReceiverToSenderLabel);
        CryptographicOperations.ZeroMemory(prk);
        return new FrameKeys(s2r, r2s);
    }
}

/// <summary>
/// AES-256-GCM over the frames of one direction. The nonce is the frame's sequence number in that
/// direction (never sent: both sides count), the frame header is the associated data, so a frame
/// that was altered, replayed, reordered, dropped or moved from the other direction fails to open.
/// A stream cut between frames is caught by the protocol above: every stream ends with an
/// explicit, sealed end exchange (End/EndAck, TunnelEof, the disk channel's End).
/// Frame on the wire: header (its length counts the tag), ciphertext of the payload, 16-byte tag.
/// Not thread-safe: the frame writer and reader call it under their own ordering.
/// </summary>
public sealed class FrameSealer : IDisposable
{
    /// <summary>Bytes a sealed frame carries in addition to its payload.</summary>
    public const int TagLength = 16;

    private readonly AesGcm _aes;
    private ulong _sequence;

    /// <param name="key">A 32-byte key of <see cref="FrameKeys"/>.</param>
    public FrameSealer(byte[] key) => _aes = new AesGcm(key, TagLength);

    /// <summary>Frames sealed or opened so far.</summary>
    public ulong Sequence => _sequence;

    /// <summary>
    /// Encrypts <paramref name="plaintext"/> into <paramref name="ciphertext"/> (same length; may
    /// be the same memory) and writes the tag, with <paramref name="header"/> (final, its length
    /// including the tag) authenticated.
    /// </summary>
    public void Seal(ReadOnlySpan<byte> header, ReadOnlySpan<byte> plaintext, Span<byte> ciphertext, Span<byte> tag)
    {
        Span<byte> nonce = stackalloc byte[12];
        NextNonce(nonce);
        _aes.Encrypt(nonce, plaintext, ciphertext, tag, header);
    }

    /// <summary>
    /// Decrypts a frame body in place; false when it does not authenticate (the sequence number is
    /// used up either way: a stream that failed once is not read further).
    /// </summary>
    public bool TryOpen(ReadOnlySpan<byte> header, Span<byte> body, ReadOnlySpan<byte> tag)
    {
        Span<byte> nonce = stackalloc byte[12];
        NextNonce(nonce);
        try
        {
            _aes.Decrypt(nonce, body, tag, body, header);
            return true;
        }
        catch (AuthenticationTagMismatchException)
        {
            body.Clear();
            return false;
        }
    }

    private void NextNonce(Span<byte> nonce)
    {
        if (_sequence == ulong.MaxValue) throw new PeerProtocolException("frame sequence number exhausted");
        nonce[..4].Clear();
        BinaryPrimitives.WriteUInt64BigEndian(nonce[4..], _sequence++);
    }

    /// <inheritdoc/>
    public void Dispose() => _aes.Dispose();
}
