//! `cargo xtask setup`: idempotent bootstrap of a fresh machine.
//!
//! Each step first checks whether its tool is already there and does nothing if
//! so; only missing pieces are installed. The eBPF toolchain is named in
//! `mbcas-ebpf/ebpf-toolchain` (read here and by `mbcas-daemon/build.rs`),
//! bpf-linker and the Debian packages here, the control-plane and node binaries
//! in `testenv` (`KUBERNETES_VERSION`, `ETCD_VERSION`, `CONTAINERD_VERSION`).

use std::process::Command;

use crate::cmd::{output_of, run_cmd};

/// The nightly toolchain that builds the eBPF crate (LLVM 22, matches bpf-linker).
pub const EBPF_TOOLCHAIN: &str = include_str!("../../mbcas-ebpf/ebpf-toolchain").trim_ascii();
/// bpf-linker release built against Debian's LLVM 22.
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
/// cargo-fuzz, for `cargo xtask fuzz` (libFuzzer on the eBPF nightly).
const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// LLVM for bpf-linker; `fonts-dejavu-core` gives the demo's charts their text; `runc`
/// (with seccomp, which a runc built without cgo lacks) and
/// `containernetworking-plugins` (bridge, host-local, loopback) serve the
/// test environment's node (`testenv up --with-node`).
const DEBIAN_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "fonts-dejavu-core",
    "runc",
    "containernetworking-plugins",
];

#[derive(Debug, clap::Args)]
pub struct Options {}

pub fn run(_opts: &Options) -> anyhow::Result<()> {
    debian_packages()?;
    ebpf_toolchain()?;
    bpf_linker()?;
    cargo_fuzz()?;
    crate::prometheus::tools()?;
    crate::helm::ensure()?;
    // etcd, kube-apiserver, kube-controller-manager, kubectl for the control-plane tier.
    crate::testenv::ensure_built()?;
    eprintln!("setup: everything is installed");
    Ok(())
}

fn debian_packages() -> anyhow::Result<()> {
    ensure_debian_packages(DEBIAN_PACKAGES)
}

/// Installs the Debian packages of `packages` that are missing (a bench's own
/// tools, e.g. nginx for `bench-latency`, as well as setup's).
pub fn ensure_debian_packages(packages: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|pkg| {
            output_of(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]))
                .is_none_or(|s| !s.contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        eprintln!("setup: Debian packages present ({})", packages.join(" "));
        return Ok(());
    }
    eprintln!("setup: installing Debian packages {}", missing.join(" "));
    run_cmd(Command::new("apt-get").arg("update").arg("-q"))?;
    run_cmd(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn ebpf_toolchain() -> anyhow::Result<()> {
    let installed = output_of(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        EBPF_TOOLCHAIN,
    ]));
    if installed
        .as_deref()
        .is_some_and(|s| s.lines().any(|l| l.starts_with("rust-src")))
    {
        eprintln!("setup: {EBPF_TOOLCHAIN} with rust-src present");
        return Ok(());
    }
    eprintln!("setup: installing {EBPF_TOOLCHAIN} with rust-src");
    run_cmd(Command::new("rustup").args([
        "toolchain",
        "install",
        EBPF_TOOLCHAIN,
        "--profile",
        "minimal",
        "--component",
        "rust-src",
    ]))
}

fn bpf_linker() -> anyhow::Result<()> {
    let version = output_of(Command::new("bpf-linker").arg("--version"));
    if version
        .as_deref()
        .is_some_and(|v| v.contains(BPF_LINKER_VERSION))
    {
        eprintln!("setup: bpf-linker {BPF_LINKER_VERSION} present");
        return Ok(());
    }
    eprintln!("setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about a minute)");
    run_cmd(
        Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--locked",
                "--force",
                "--version",
                BPF_LINKER_VERSION,
            ])
            .args(["--no-default-features", "--features", "llvm-22"])
            .env("LLVM_PREFIX", LLVM_PREFIX),
    )
}

/// cargo-fuzz at its pinned version.
pub fn cargo_fuzz() -> anyhow::Result<()> {
    let version = output_of(Command::new("cargo").args(["fuzz", "--version"]));
    if version
        .as_deref()
        .is_some_and(|v| v.contains(CARGO_FUZZ_VERSION))
    {
        eprintln!("setup: cargo-fuzz {CARGO_FUZZ_VERSION} present");
        return Ok(());
    }
    eprintln!("setup: building cargo-fuzz {CARGO_FUZZ_VERSION} (about a minute)");
    run_cmd(Command::new("cargo").args([
        "install",
        "cargo-fuzz",
        "--locked",
        "--force",
        "--version",
        CARGO_FUZZ_VERSION,
    ]))
}
