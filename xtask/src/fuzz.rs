//! `cargo xtask fuzz [--seconds N] [--target NAME]`: every fuzz target of
//! `mbcas-daemon/fuzz` (cargo-fuzz, libFuzzer with AddressSanitizer, on the
//! nightly the eBPF crate pins) for N seconds each.
//!
//! Each target runs on a corpus kept in `target/fuzz/corpus/<target>` (it grows
//! from run to run) seeded from the committed `mbcas-daemon/fuzz/seeds/<target>`
//! and, where they exist, real inputs: the shipped scenarios, the `mbcas solve`
//! golden inputs, this machine's `/sys/kernel/btf/vmlinux`. A crash, a leak, a
//! timeout (an input taking longer than 10 s) or running out of memory fails
//! the command; the input is kept in `mbcas-daemon/fuzz/artifacts/<target>/`
//! for a regression test.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, bail};

use crate::{cmd::run_cmd, setup::EBPF_TOOLCHAIN};

/// Every target of `mbcas-daemon/fuzz/Cargo.toml`.
pub const TARGETS: &[&str] = &[
    "cgroup_files",
    "kubepods_path",
    "btf",
    "cpu_quantity",
    "scenario",
    "solve",
    "pod_allocation",
];

#[derive(Debug, clap::Args)]
pub struct Options {
    /// How long each target runs.
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// Build without optimisation: quicker to build (CI's short pass), slower to fuzz.
    #[arg(long)]
    pub dev: bool,
    /// Run only this target (default: all).
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(TARGETS))]
    pub target: Option<String>,
}

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../mbcas-daemon/fuzz")
}

/// `cargo +<nightly> fuzz <sub> …` in the fuzz crate, with the eBPF build
/// skipped (the targets never load the programs) and its own target dir.
fn cargo_fuzz(sub: &str) -> Command {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut cmd = Command::new("cargo");
    cmd.arg(format!("+{EBPF_TOOLCHAIN}"))
        .args(["fuzz", sub, "--fuzz-dir"])
        .arg(fuzz_dir())
        .env("AYA_BUILD_SKIP", "1")
        .env("CARGO_TARGET_DIR", root.join("target/fuzz/build"))
        .current_dir(&root);
    cmd
}

/// Seed directories beyond the committed ones: real inputs of this checkout
/// and machine.
fn real_inputs(target: &str, scratch: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    Ok(match target {
        "scenario" => vec![root.join("scenarios")],
        "solve" => vec![root.join("mbcas-daemon/tests/golden/solve")],
        "btf" => {
            let vmlinux = Path::new("/sys/kernel/btf/vmlinux");
            if !vmlinux.exists() {
                return Ok(Vec::new());
            }
            let dir = scratch.join("btf-vmlinux");
            std::fs::create_dir_all(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
            std::fs::copy(vmlinux, dir.join("vmlinux"))
                .with_context(|| format!("copy {}", vmlinux.display()))?;
            vec![dir]
        }
        _ => Vec::new(),
    })
}

/// The committed seeds of `target`, when it has any.
fn seeds(target: &str) -> Option<PathBuf> {
    Some(fuzz_dir().join("seeds").join(target)).filter(|d| d.is_dir())
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    crate::setup::cargo_fuzz()?;
    let targets: Vec<&str> = match &opts.target {
        Some(t) => vec![t.as_str()],
        None => TARGETS.to_vec(),
    };
    let t = Instant::now();
    eprintln!("fuzz: building {} target(s)", targets.len());
    let profile: &[&str] = if opts.dev {
        &["--dev"]
    } else {
        &["-O", "--debug-assertions"]
    };
    run_cmd(cargo_fuzz("build").args(profile))?;
    eprintln!("fuzz: built in {:.0} s", t.elapsed().as_secs_f64());
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/fuzz");
    let mut failed = Vec::new();
    for target in &targets {
        let corpus = root.join("corpus").join(target);
        std::fs::create_dir_all(&corpus).with_context(|| format!("mkdir {}", corpus.display()))?;
        let mut cmd = cargo_fuzz("run");
        cmd.args(profile)
            .arg(target)
            .arg(&corpus)
            .args(seeds(target))
            .args(real_inputs(target, &root.join("scratch"))?)
            .arg("--")
            .arg(format!("-max_total_time={}", opts.seconds))
            .args(["-timeout=10", "-rss_limit_mb=2048", "-print_final_stats=1"]);
        eprintln!("fuzz: {target} for {} s", opts.seconds);
        if let Err(e) = run_cmd(&mut cmd) {
            eprintln!("fuzz: {target} FAILED: {e:#}");
            failed.push(*target);
        }
        let inputs = std::fs::read_dir(&corpus).map_or(0, Iterator::count);
        println!("fuzz: {target}: corpus {inputs} inputs");
    }
    if !failed.is_empty() {
        bail!(
            "fuzz: {} failed: {} (inputs in {}/artifacts/)",
            failed.len(),
            failed.join(", "),
            fuzz_dir().display()
        );
    }
    println!(
        "fuzz: {} passed, 0 failed ({} s each)",
        targets.len(),
        opts.seconds
    );
    Ok(())
}
