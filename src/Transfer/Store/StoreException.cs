namespace BFMig.Transfer.Store;

/// <summary>The store cannot be used for this trip (locked by another helper, unreadable, wrong layout); the trip can still run without it.</summary>
public sealed class StoreException : Exception
{
    public StoreException(string message) : base(message) { }
    public StoreException(string message, Exception inner) : base(message, inner) { }
    public StoreException() { }
}
