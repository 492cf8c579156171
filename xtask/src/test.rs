//! `cargo xtask test`: the one command that runs every test tier.
//!
//! It runs `setup` first, so a fresh machine needs nothing else.

use std::process::Command;

use crate::setup::{self, run_cmd};

#[derive(Debug, clap::Args)]
pub struct Options {}

pub fn run(_opts: &Options) -> anyhow::Result<()> {
    setup::run(&setup::Options {})?;
    run_cmd(Command::new("cargo").args(["test", "--all-targets"]))?;
    Ok(())
}
