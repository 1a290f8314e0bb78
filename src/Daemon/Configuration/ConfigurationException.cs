namespace BFMig.Daemon.Configuration;

/// <summary>
/// A setting is missing, malformed or out of range. The message names the key, the bad value
/// and where it came from (the file, an environment variable or the command line), so an
/// operator can fix it without reading code.
/// </summary>
public sealed class ConfigurationException : Exception
{
    public ConfigurationException(string message) : base(message) { }

    public ConfigurationException(string message, Exception inner) : base(message, inner) { }
}
