//! The command line of `mbcas`. Each subcommand's arguments live next to the
//! module that implements it; this file only lists the subcommands.

use clap::{Parser, Subcommand};

/// Exit code for invalid configuration or input (sysexits EX_USAGE).
pub const EXIT_USAGE: i32 = 64;

#[derive(Debug, Parser)]
#[command(name = "mbcas", version, about = "Market-based CPU allocation for Kubernetes pods")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }
}
