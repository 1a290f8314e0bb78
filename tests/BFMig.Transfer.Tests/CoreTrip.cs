using BFMig.Transfer.Memory;


namespace BFMig.Transfer.Tests;

/// <summary>Runs encoder -> frames -> decoder in memory, as the helpers do over a socket, and commits like the End exchange.</summary>
internal static class CoreTrip
{
    /// <summary>Sends the encoder's ops as one frame through the decoder, the rebuilt bytes into <paramref name="output"/>.</summary>
    public static void Ship(MigEncoder enc, MigDecoder dec, Stream output)
    {
        enc.CompleteOps();
        var frame = enc.Ops.ToArray();
        enc.ResetOps();
        if (frame.Length == 0) return;
        dec.BeginFrame();
        int pos = 0;
        do
        {
            pos = dec.Process(frame, pos);
            output.Write(dec.Output);
            dec.ResetOutput();
        }
        while (pos < frame.Length || dec.HasPendingOutput);
    }

    public static (byte[] Output, TransferStats Send, TransferStats Receive) Run(byte[] stream, MemoryStore sender, MemoryStore receiver, int chunk = 65536)
    {
        bool synced = sender.State.Generation != 0 && sender.State.Generation == receiver.State.Generation
            && sender.State.Digest == receiver.State.Digest && sender.State.Seed == receiver.State.Seed;
        ulong seed = sender.State.Seed;
        var ss = new TransferStats();
        var rs = new TransferStats();
        var enc = new MigEncoder(sender, synced, seed, ss);
        var dec = new MigDecoder(receiver, synced, seed, rs);
        using var output = new MemoryStream();
        int start = 0, end = 0;
        void Ship() => CoreTrip.Ship(enc, dec, output);
        while (true)
        {
            bool final = end == stream.Length;
            start += enc.Consume(stream.AsSpan(start, end - start), final);
            if (enc.OpsLength >= MigEncoder.FlushThreshold) { Ship(); continue; }
            if (final && start == end) break;
            end = Math.Min(stream.Length, end + chunk);
        }
        Ship();
        ulong gen = Math.Max(sender.State.Generation, receiver.State.Generation) + 1;
        if (enc.TripStarted)
        {
            Assert.Equal(sender.ComputeDigest(), receiver.ComputeDigest());
            receiver.Commit(gen, "sender", enc.Parser.RamComplete);
            sender.Commit(gen, "receiver", enc.Parser.RamComplete);
        }
        return (output.ToArray(), ss, rs);
    }
}
