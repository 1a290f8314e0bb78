using BFMig.Native.Systemd;
using Microsoft.Extensions.Logging;
using Serilog;
using Serilog.Core;
using Serilog.Events;
using Serilog.Extensions.Logging;
using Serilog.Formatting;
using Serilog.Formatting.Display;

namespace BFMig.Daemon.Logging;

/// <summary>
/// Serilog, configured in code (Serilog.Settings.Configuration does not survive native AOT).
/// Under systemd, stdout goes to the journal: each line then starts with a syslog priority
/// prefix (<c>&lt;6&gt;</c>) so journald files it at the right level (SyslogLevelPrefix=yes is
/// systemd's default). Components log through Microsoft.Extensions.Logging with
/// [LoggerMessage] methods; Serilog is only the provider.
/// </summary>
public static class DaemonLogging
{
    private const string Template = "{SyslogPrefix}{Timestamp:HH:mm:ss.fff} {Level:u3} {SourceContext}: {Message:lj}{NewLine}{Exception}";
    private const string JournalTemplate = "{SyslogPrefix}{SourceContext}: {Message:lj}{NewLine}{Exception}";

    /// <summary>Maps bfmig.conf's <c>log_level</c> to Serilog's minimum level.</summary>
    public static LogEventLevel ParseLevel(string level) => level switch
    {
        "debug" => LogEventLevel.Debug,
        "info" => LogEventLevel.Information,
        "warning" => LogEventLevel.Warning,
        "error" => LogEventLevel.Error,
        _ => throw new ArgumentOutOfRangeException(nameof(level), level, "expected debug, info, warning or error"),
    };

    /// <summary>Creates the process-wide logger factory. Dispose it to flush.</summary>
    public static ILoggerFactory Create(string level, TextWriter? output = null, bool? underJournal = null)
    {
        var journal = underJournal ?? Environment.GetEnvironmentVariable("JOURNAL_STREAM") is { Length: > 0 };
        var config = new LoggerConfiguration()
            .MinimumLevel.Is(ParseLevel(level))
            .Enrich.With(new SyslogPrefixEnricher(journal))
            .Enrich.With(new EscapingEnricher());
        var template = journal ? JournalTemplate : Template;
        var serilog = output is null
            ? config.WriteTo.Console(outputTemplate: template, formatProvider: System.Globalization.CultureInfo.InvariantCulture).CreateLogger()
            : config.WriteTo.Sink(new WriterSink(new MessageTemplateTextFormatter(template, System.Globalization.CultureInfo.InvariantCulture), output)).CreateLogger();
        return new SerilogLoggerFactory(serilog, dispose: true);
    }

    /// <summary>Adds the <c>&lt;N&gt;</c> priority prefix when writing to the journal, nothing otherwise.</summary>
    private sealed class SyslogPrefixEnricher(bool journal) : ILogEventEnricher
    {
        private static readonly LogEventProperty[] Prefixes =
        [
            new("SyslogPrefix", new ScalarValue("<7>")), // Verbose -> debug
            new("SyslogPrefix", new ScalarValue("<7>")), // Debug
            new("SyslogPrefix", new ScalarValue("<6>")), // Information -> info
            new("SyslogPrefix", new ScalarValue("<4>")), // Warning
            new("SyslogPrefix", new ScalarValue("<3>")), // Error -> err
            new("SyslogPrefix", new ScalarValue("<2>")), // Fatal -> crit
        ];

        private static readonly LogEventProperty None = new("SyslogPrefix", new ScalarValue(""));

        public void Enrich(LogEvent logEvent, ILogEventPropertyFactory propertyFactory) =>
            logEvent.AddPropertyIfAbsent(journal ? Prefixes[(int)logEvent.Level] : None);
    }

    /// <summary>
    /// Escapes every string value of every event (<see cref="LogText.Escape"/>): peer names, abort
    /// reasons, guest names and helper messages reach the log through many messages, and one rule
    /// here covers them all, including those added later. The message templates are ours and stay as they are.
    /// </summary>
    private sealed class EscapingEnricher : ILogEventEnricher
    {
        public void Enrich(LogEvent logEvent, ILogEventPropertyFactory propertyFactory)
        {
            List<LogEventProperty>? changed = null;
            foreach (var (name, value) in logEvent.Properties)
            {
                if (value is ScalarValue { Value: string text } && LogText.Escape(text) is var escaped && !ReferenceEquals(escaped, text))
                    (changed ??= []).Add(new LogEventProperty(name, new ScalarValue(escaped)));
            }
            if (changed is not null)
            {
                foreach (var property in changed)
                    logEvent.AddOrUpdateProperty(property);
            }
        }
    }

    /// <summary>Writes formatted events to a given writer (tests, or a redirected stdout).</summary>
    private sealed class WriterSink(ITextFormatter formatter, TextWriter output) : ILogEventSink
    {
        private readonly Lock _gate = new();

        public void Emit(LogEvent logEvent)
        {
            lock (_gate)
            {
                formatter.Format(logEvent, output);
                output.Flush();
            }
        }
    }
}
