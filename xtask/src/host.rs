//! What the xtask commands that touch this machine share: where the cgroup CPU
//! controller lives, and the `mbcas` binary they drive.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::bail;

use crate::cmd::run_cmd;

/// Roots of the hierarchies with the `cpu` (and, on v1 hybrids, `cpuacct`) controller.
pub struct CgroupRoots {
    pub cpu: PathBuf,
    /// v1 with `cpuacct` mounted apart from `cpu`: its root.
    pub cpuacct: Option<PathBuf>,
    pub v2: bool,
}

impl CgroupRoots {
    pub fn detect() -> anyhow::Result<Self> {
        let v1 = Path::new("/sys/fs/cgroup/cpu");
        if v1.join("cpu.cfs_quota_us").exists() {
            let acct = Path::new("/sys/fs/cgroup/cpuacct");
            let separate =
                acct.join("cpuacct.usage").exists() && !v1.join("cpuacct.usage").exists();
            return Ok(Self {
                cpu: v1.to_owned(),
                cpuacct: separate.then(|| acct.to_owned()),
                v2: false,
            });
        }
        if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
            return Ok(Self {
                cpu: "/sys/fs/cgroup".into(),
                cpuacct: None,
                v2: true,
            });
        }
        bail!("no cgroup cpu controller found")
    }
}

/// Builds `mbcas` (release or debug) and returns the binary's path.
pub fn build_mbcas(release: bool) -> anyhow::Result<PathBuf> {
    let mut cmd = Command::new("cargo");
    cmd.args([
        "build",
        "--quiet",
        "--package",
        "mbcas-daemon",
        "--bin",
        "mbcas",
    ]);
    if release {
        cmd.arg("--release");
    }
    run_cmd(&mut cmd)?;
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| PathBuf::from("target"), PathBuf::from);
    Ok(target
        .join(if release { "release" } else { "debug" })
        .join("mbcas"))
}

/// Removes a cgroup directory we made, retrying for up to 2 s while the
/// kernel still counts its last tasks (a missing directory is done).
pub fn remove_cgroup(d: &Path) {
    for _ in 0..100 {
        if !d.exists() || std::fs::remove_dir(d).is_ok() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// `mbcas run --mode local` over `root` with a capacity of `capacity_m` and no
/// node reserve, quiet (warnings only): how the demo and bench-latency run MBCAS.
pub fn local_daemon(bin: &Path, root: &Path, capacity_m: u64) -> Command {
    let mut cmd = Command::new(bin);
    cmd.args([
        "--log-level",
        "warn",
        "run",
        "--mode",
        "local",
        "--node-reserve",
        "0",
        "--capacity-millicores",
    ])
    .arg(capacity_m.to_string())
    .arg("--local-root")
    .arg(root)
    .stdin(std::process::Stdio::null());
    cmd
}
