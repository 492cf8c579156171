//! `cargo xtask build-ebpf`: build the kernel programs.
//!
//! A thin wrapper: the eBPF object is built by `mbcas-daemon/build.rs` (aya-build)
//! whenever the daemon is built, so this builds the daemon and reports where the
//! object landed and how large it is. There is no second copy of the flags.

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, bail};

use crate::cmd::run_cmd;

#[derive(Debug, clap::Args)]
pub struct Options {
    /// Build in release mode.
    #[arg(long)]
    pub release: bool,
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    crate::setup::run(&crate::setup::Options {})?;
    let mut cmd = Command::new("cargo");
    cmd.args(["build", "--package", "mbcas-daemon", "--bin", "mbcas"]);
    if opts.release {
        cmd.arg("--release");
    }
    run_cmd(&mut cmd)?;
    let profile = if opts.release { "release" } else { "debug" };
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target"));
    let build = target.join(profile).join("build");
    let mut newest: Option<(std::time::SystemTime, PathBuf)> = None;
    for entry in std::fs::read_dir(&build).with_context(|| format!("read {}", build.display()))? {
        let obj = entry?.path().join("out").join("mbcas");
        if let Ok(meta) = obj.metadata()
            && let Ok(t) = meta.modified()
            && newest.as_ref().is_none_or(|(n, _)| t > *n)
        {
            newest = Some((t, obj));
        }
    }
    let Some((_, obj)) = newest else {
        bail!("no eBPF object under {}", build.display())
    };
    let size = obj.metadata()?.len();
    if size == 0 {
        bail!(
            "{} is empty: the eBPF build was skipped (see the cargo warnings above)",
            obj.display()
        );
    }
    println!("eBPF object: {} ({size} bytes)", obj.display());
    Ok(())
}
