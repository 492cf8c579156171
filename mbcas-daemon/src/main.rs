//! `mbcas`: parse the command line, set up logging, run one subcommand.
//!
//! Each subcommand returns `anyhow::Result<ExitCode>`; errors are printed with
//! their whole cause chain and exit with code 1 unless the command chose another.

use std::process::ExitCode;

use clap::Parser as _;
use mbcas::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = mbcas::telemetry::init(&cli.log_level, cli.log_format) {
        eprintln!("error: {e}");
        return ExitCode::from(mbcas::cli::EXIT_USAGE);
    }
    let result: anyhow::Result<ExitCode> = match cli.command {
        Command::Version => {
            println!("mbcas {}", env!("CARGO_PKG_VERSION"));
            Ok(ExitCode::SUCCESS)
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
