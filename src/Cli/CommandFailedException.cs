namespace BFMig.Cli;

/// <summary>
/// The command could not do its job (exit status 1). The message is printed as is after
/// "bfmig: ", so it should say what failed and what to do about it.
/// </summary>
internal sealed class CommandFailedException : Exception
{
    public CommandFailedException(string message) : base(message)
    {
    }

    public CommandFailedException(string message, Exception inner) : base(message, inner)
    {
    }
}
