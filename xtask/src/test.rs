//! `cargo xtask test`: the one command that runs every test tier.
//!
//! It runs `setup` first, so a fresh machine needs nothing else, then:
//! 1. `cargo test --all-targets`: unit, property and golden tests, the kernel
//!    tier (real eBPF, cgroups and burners; it fails rather than skips in CI) and
//!    the control-plane tier, against a `cargo xtask testenv` control plane started
//!    here (its kubeconfig in `MBCAS_TESTENV_KUBECONFIG`) and stopped afterwards;
//! 2. a short `cargo xtask demo` whose JSON must show MBCAS throttling less than
//!    static limits (root only; outside CI it is skipped with a message).

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, bail};

use crate::{
    setup::{self, run_cmd},
    testenv,
};

#[derive(Debug, clap::Args)]
pub struct Options {
    /// Skip the short demo run.
    #[arg(long)]
    pub no_demo: bool,
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    setup::run(&setup::Options {})?;
    let (kubeconfig, started) = testenv::up(true)?;
    let tests = run_cmd(
        Command::new("cargo")
            .args(["test", "--all-targets"])
            .env(testenv::KUBECONFIG_ENV, &kubeconfig),
    );
    // Stop the control plane even when tests failed, unless it was already
    // running before (then it belongs to whoever started it).
    let stopped = if started { testenv::down() } else { Ok(()) };
    tests?;
    stopped?;
    if opts.no_demo {
        return Ok(());
    }
    if !is_root() {
        if std::env::var_os("CI").is_some() {
            bail!("the demo tier needs root and CI must run it");
        }
        eprintln!("SKIP (demo tier): not running as root");
        return Ok(());
    }
    let out = PathBuf::from("target/demo-ci.json");
    crate::demo::run(&crate::demo::Options {
        duration: 60,
        json_out: Some(out.clone()),
        report_dir: PathBuf::from("target/demo-ci"),
    })?;
    let v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&out).with_context(|| format!("read {}", out.display()))?,
    )?;
    let (s, m) = (
        v["static"]["throttled_ratio"].as_f64(),
        v["mbcas"]["throttled_ratio"].as_f64(),
    );
    match (s, m) {
        (Some(s), Some(m)) if m < s => {
            println!("demo: MBCAS throttled-period ratio {m:.3} < static {s:.3}");
            println!("demo: 1 passed, 0 failed");
            Ok(())
        }
        _ => bail!(
            "demo: MBCAS did not reduce the throttled-period ratio (static {s:?}, mbcas {m:?})"
        ),
    }
}
