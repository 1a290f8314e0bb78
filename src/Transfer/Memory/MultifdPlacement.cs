namespace BFMig.Transfer.Memory;

/// <summary>Where a multifd page belongs in the store: its packet's RAMBlock name and offset, mapped onto the trip's layout.</summary>
internal sealed class MultifdPlacement(MemoryStore? store)
{
    private string? _lastName;
    private int _lastBlock = -1;

    /// <summary>False when there is no store trip, the block is not in its layout, or the page lies beyond the block.</summary>
    public bool TryLocate(string name, ulong offset, out int block, out long page)
    {
        page = (long)Math.Min(offset >> QemuFormat.PageShift, long.MaxValue);
        block = -1;
        if (store is null) return false;
        if (name != _lastName)
        {
            _lastName = name;
            _lastBlock = store.BlockIndex(name);
        }
        block = _lastBlock;
        return block >= 0 && page < store.PageCount(block);
    }

    /// <summary>Records the zero pages a header lists (9.0+): QEMU's receiver zeroes them, so both stores must.</summary>
    public void PutZeroPages(MultifdPacket packet, PageWrite write)
    {
        foreach (ulong offset in packet.ZeroOffsets)
        {
            if (TryLocate(packet.RamBlock, offset, out int block, out long page))
                store!.PutZero(block, page, write);
        }
    }
}
