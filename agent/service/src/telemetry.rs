//! Logging: tracing to stderr, plain lines by default (journald adds its own timestamps when
//! `$JOURNAL_STREAM` says stderr goes to the journal), or JSON. The filter can be replaced at
//! run time (SIGHUP reloads `[log] level`).

use serde::{Deserialize, Serialize};
use tracing_subscriber::prelude::*;
use tracing_subscriber::{EnvFilter, reload};

/// Log line format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Plain,
    Json,
}

/// Replaces the active log filter.
pub struct FilterHandle(reload::Handle<EnvFilter, tracing_subscriber::Registry>);

impl FilterHandle {
    /// Applies `level` unless `RUST_LOG` is set (the environment wins, as at start).
    pub fn set(&self, level: &str) -> Result<(), String> {
        if std::env::var_os("RUST_LOG").is_some() {
            return Ok(());
        }
        let filter = EnvFilter::try_new(level).map_err(|e| e.to_string())?;
        self.0.reload(filter).map_err(|e| e.to_string())
    }
}

/// Installs the global subscriber. Call once, early in main.
pub fn init(format: LogFormat, level: &str) -> FilterHandle {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let ansi = !journald && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_current_span(false)
                    .with_writer(std::io::stderr),
            )
            .init(),
        LogFormat::Plain if journald => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .without_time()
                    .with_ansi(false)
                    .with_target(false)
                    .with_writer(std::io::stderr),
            )
            .init(),
        LogFormat::Plain => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(ansi)
                    .with_target(false)
                    .with_writer(std::io::stderr),
            )
            .init(),
    }
    FilterHandle(handle)
}

/// A Prometheus label value as the text format writes it: `\\`, `"` and newline escaped.
/// prometheus-client 0.24 writes label values as given, so a value from a host (a repository
/// id) holding `"` or a newline would otherwise end the label and forge series of its own; the
/// agent's and the controller's `/metrics` pass every such value through here.
pub fn metric_label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}
