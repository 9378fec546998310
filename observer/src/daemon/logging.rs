//! The agent's log stream: tracing events, and through tracing's `log` bridge the messages
//! of its libraries and of its eBPF programs (aya-log), all in one format on stderr.
//!
//! Text is coloured only on a terminal and never when `NO_COLOR` is set; JSON writes one
//! object per line with the event's fields at the top level, for log collectors.

use std::io::IsTerminal as _;

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

use crate::config::{LogFormat, LogLevel};

/// Installs the global subscriber and the `log` bridge. Call once, before anything logs.
pub fn init(format: LogFormat, level: &LogLevel) -> Result<(), String> {
    let filter = EnvFilter::try_new(&level.0).map_err(|e| format!("log filter `{level}`: {e}"))?;
    let layer = match format {
        LogFormat::Text => fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(colour_allowed(std::io::stderr().is_terminal()))
            .boxed(),
        LogFormat::Json => fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .boxed(),
    };
    // `try_init` also routes the `log` crate (aya-log, zbus, tonic) into tracing.
    tracing_subscriber::registry()
        .with(layer.with_filter(filter))
        .try_init()
        .map_err(|e| format!("cannot install the logger: {e}"))
}

/// Whether to write ANSI colours to a stream that is (or is not) a terminal, honouring
/// `NO_COLOR` (<https://no-color.org>).
pub fn colour_allowed(is_terminal: bool) -> bool {
    is_terminal && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}
