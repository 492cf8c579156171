//! Logging set-up: `tracing` with a text or JSON formatter on stderr.
//!
//! Records from the `log` crate are bridged into `tracing` (tracing-subscriber's
//! `tracing-log` feature installs a `LogTracer` when the subscriber is set). This
//! is how the eBPF programs' aya-log lines, which `aya_log::EbpfLogger` emits
//! through `log`, reach the same formatter and filter as the rest of the daemon.

use std::io::IsTerminal as _;

use clap::ValueEnum;
use tracing_subscriber::{EnvFilter, fmt, fmt::MakeWriter, prelude::*};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Installs the global subscriber. `level` is an `EnvFilter` directive such as
/// `info` or `mbcas=debug`; `RUST_LOG`, when set, wins.
pub fn init(level: &str, format: LogFormat) -> Result<(), TelemetryError> {
    install(
        level,
        format,
        std::io::stderr,
        std::io::stderr().is_terminal(),
    )
}

/// [`init`] with another destination than stderr (tests capture the output);
/// text without colours.
pub fn init_with_writer<W>(level: &str, format: LogFormat, writer: W) -> Result<(), TelemetryError>
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    install(level, format, writer, false)
}

/// The target of the eBPF programs' log records (aya-log).
pub const EBPF_LOG_TARGET: &str = "mbcas_ebpf";

/// Whether the installed filter (`--log-level`, or `RUST_LOG` when set) lets
/// the eBPF programs' debug records through; the sensor then loads the
/// programs with logging on. False before [`init`].
pub fn ebpf_debug_enabled() -> bool {
    tracing::enabled!(target: EBPF_LOG_TARGET, tracing::Level::DEBUG)
}

fn install<W>(level: &str, format: LogFormat, writer: W, ansi: bool) -> Result<(), TelemetryError>
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let filter = match std::env::var("RUST_LOG") {
        Ok(s) if !s.is_empty() => EnvFilter::try_new(s),
        _ => EnvFilter::try_new(level),
    }
    .map_err(|source| TelemetryError::Filter {
        level: level.to_owned(),
        source,
    })?;
    let registry = tracing_subscriber::registry().with(filter);
    let res = match format {
        LogFormat::Text => registry
            .with(fmt::layer().with_ansi(ansi).with_writer(writer))
            .try_init(),
        LogFormat::Json => registry
            .with(fmt::layer().json().with_writer(writer))
            .try_init(),
    };
    res.map_err(|e| TelemetryError::Install(e.to_string()))
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("invalid --log-level {level:?}")]
    Filter {
        level: String,
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
    #[error("a global tracing subscriber is already installed: {0}")]
    Install(String),
}
