//! Builds the eBPF programs (`mbcas-ebpf`) with aya-build and leaves the object in
//! `OUT_DIR/mbcas` for `include_bytes_aligned!`.
//!
//! Skip path: with `AYA_BUILD_SKIP=1`, or when the pinned nightly or bpf-linker is
//! missing, an empty object is written instead (with a cargo warning), so pure code
//! still builds and tests; the daemon then says at run time that no eBPF object is
//! embedded and uses the cgroup-polling sensor. `cargo xtask setup` installs both.

use std::{env, fs, path::PathBuf, process::Command};

use anyhow::{Context as _, anyhow};

/// The nightly that builds the eBPF crate; `cargo xtask setup` installs the same one.
const EBPF_TOOLCHAIN_FILE: &str = include_str!("../mbcas-ebpf/ebpf-toolchain");

fn main() -> anyhow::Result<()> {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").ok_or_else(|| anyhow!("OUT_DIR not set"))?);
    let object = out_dir.join("mbcas");
    let toolchain = EBPF_TOOLCHAIN_FILE.trim();
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    println!("cargo:rerun-if-changed=../mbcas-ebpf/ebpf-toolchain");
    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        println!("cargo:warning=not building the eBPF programs (AYA_BUILD_SKIP is set)");
        return fs::write(&object, []).with_context(|| format!("write {}", object.display()));
    }
    if let Some(why) = missing_toolchain(toolchain) {
        println!("cargo:warning=not building the eBPF programs ({why}); run `cargo xtask setup`");
        // A rerun-if-changed path that does not exist makes cargo run this
        // script on every build, so installing the toolchain later is picked
        // up without `cargo clean`.
        println!(
            "cargo:rerun-if-changed={}",
            out_dir
                .join("until-the-ebpf-toolchain-is-installed")
                .display()
        );
        return fs::write(&object, []).with_context(|| format!("write {}", object.display()));
    }
    let manifest_dir = env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let ebpf_dir = PathBuf::from(manifest_dir).join("..").join("mbcas-ebpf");
    let root_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", ebpf_dir.display()))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "mbcas-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(toolchain),
    )
}

/// Why the eBPF toolchain cannot run, if it cannot.
fn missing_toolchain(toolchain: &str) -> Option<String> {
    let linker = Command::new("bpf-linker").arg("--version").output();
    if !linker.is_ok_and(|o| o.status.success()) {
        return Some("bpf-linker not found".into());
    }
    let rustc = Command::new("rustup")
        .args(["run", toolchain, "rustc", "--version"])
        .output();
    if !rustc.is_ok_and(|o| o.status.success()) {
        return Some(format!("toolchain {toolchain} not installed"));
    }
    None
}
