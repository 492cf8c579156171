//! The cgroup layer: where the CPU controller lives, which cgroup is which pod,
//! and the files that hold limits, weights and pressure.
//!
//! * [`Layout`]: v1, v2 or hybrid (v1 controllers plus a controller-less cgroup2
//!   mount, as on this project's CI machines), from `/proc/self/mountinfo`.
//! * [`kubernetes`]: recognises pod and container cgroups of the systemd and
//!   cgroupfs drivers, containerd / CRI-O / Docker, Kind's nested
//!   `kubelet.slice`, and the QoS classes.
//! * [`index::CgroupIndex`]: cgroup id (the directory's inode) ↔ path, rescanned
//!   to follow cgroups as they come and go.
//! * [`dir`]: a cgroup directory ([`CgroupDir`]: id, hierarchy, where its
//!   usage lives) and its bandwidth counters (`cpu.stat`, `cpuacct.usage`).
//! * [`runq`]: run-queue wait summed from `/proc/<tid>/schedstat`, and a
//!   cgroup's descendants.
//! * [`files`]: `cpu.max` / `cpu.cfs_quota_us`+`cpu.cfs_period_us` (read and
//!   write), `cpu.weight` / `cpu.shares`, `cpu.pressure`.
//!
//! Every file is read through one function ([`dir::read_file`]): a file that
//! is gone means the cgroup vanished.

pub mod dir;
pub mod files;
pub mod index;
pub mod kubernetes;
pub mod runq;

use std::path::{Path, PathBuf};

pub use dir::{CgroupDir, CgroupFsError, CpuCounters, Hierarchy, Mounts};

/// How the machine mounts cgroups.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    pub kind: LayoutKind,
    /// Root of the hierarchy that has the `cpu` controller.
    pub cpu_root: PathBuf,
    /// v1: root of the `cpuacct` hierarchy when it is mounted apart from `cpu`.
    pub cpuacct_root: Option<PathBuf>,
    /// The cgroup2 mount, if any (with or without controllers).
    pub unified: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayoutKind {
    /// cgroup v1 only.
    V1,
    /// v1 controllers plus a cgroup2 mount without the cpu controller.
    Hybrid,
    /// cgroup v2 with the cpu controller.
    V2,
}

impl LayoutKind {
    pub const fn hierarchy(self) -> Hierarchy {
        match self {
            Self::V1 | Self::Hybrid => Hierarchy::V1,
            Self::V2 => Hierarchy::V2,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("cannot read /proc/self/mountinfo")]
    Mountinfo(#[source] std::io::Error),
    #[error(
        "no cgroup hierarchy with the cpu controller is mounted (looked for a v1 `cpu` mount and a cgroup2 mount listing `cpu` in cgroup.controllers)"
    )]
    NoCpuController,
}

impl Layout {
    /// Detects the running machine's layout.
    pub fn detect() -> Result<Self, LayoutError> {
        let text =
            std::fs::read_to_string("/proc/self/mountinfo").map_err(LayoutError::Mountinfo)?;
        Self::from_mountinfo(&text, |p| {
            std::fs::read_to_string(p.join("cgroup.controllers")).ok()
        })
    }

    /// Detects the layout from mountinfo text; `controllers` reads a cgroup2
    /// mount's `cgroup.controllers` (injected for tests).
    pub fn from_mountinfo(
        text: &str,
        controllers: impl Fn(&Path) -> Option<String>,
    ) -> Result<Self, LayoutError> {
        let mounts = Mounts::parse(text);
        let unified = text.lines().find_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            if right.split_whitespace().next()? != "cgroup2" {
                return None;
            }
            left.split_whitespace().nth(4).map(PathBuf::from)
        });
        if let Some(cpu) = mounts.cpu.clone() {
            let cpuacct_root = mounts.cpuacct.clone().filter(|a| *a != cpu);
            let kind = if unified.is_some() {
                LayoutKind::Hybrid
            } else {
                LayoutKind::V1
            };
            return Ok(Self {
                kind,
                cpu_root: cpu,
                cpuacct_root,
                unified,
            });
        }
        match &unified {
            Some(u) if controllers(u).is_some_and(|c| c.split_whitespace().any(|x| x == "cpu")) => {
                Ok(Self {
                    kind: LayoutKind::V2,
                    cpu_root: u.clone(),
                    cpuacct_root: None,
                    unified,
                })
            }
            _ => Err(LayoutError::NoCpuController),
        }
    }

    pub fn mounts(&self) -> Mounts {
        match self.kind {
            LayoutKind::V2 => Mounts::default(),
            _ => Mounts {
                cpu: Some(self.cpu_root.clone()),
                cpuacct: self
                    .cpuacct_root
                    .clone()
                    .or_else(|| Some(self.cpu_root.clone())),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
25 1 0:22 / /sys/fs/cgroup ro - tmpfs tmpfs ro,mode=755\n\
30 25 0:26 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n\
31 25 0:27 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct\n\
40 25 0:35 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
    const V2: &str = "35 24 0:30 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
    const V1: &str = "30 25 0:26 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n";

    #[test]
    fn detects_hybrid_v1_v2() {
        let h = Layout::from_mountinfo(HYBRID, |_| Some(String::new())).unwrap();
        assert_eq!(h.kind, LayoutKind::Hybrid);
        assert_eq!(h.cpu_root, PathBuf::from("/sys/fs/cgroup/cpu"));
        assert_eq!(
            h.cpuacct_root,
            Some(PathBuf::from("/sys/fs/cgroup/cpuacct"))
        );
        let v2 =
            Layout::from_mountinfo(V2, |_| Some("cpuset cpu io memory pids\n".into())).unwrap();
        assert_eq!(
            (v2.kind, v2.cpu_root.as_path()),
            (LayoutKind::V2, Path::new("/sys/fs/cgroup"))
        );
        let v1 = Layout::from_mountinfo(V1, |_| None).unwrap();
        assert_eq!((v1.kind, v1.cpuacct_root.clone()), (LayoutKind::V1, None));
        assert!(matches!(
            Layout::from_mountinfo(V2, |_| Some("memory pids".into())),
            Err(LayoutError::NoCpuController)
        ));
        assert!(Layout::from_mountinfo("", |_| None).is_err());
    }

    #[test]
    fn this_machine_is_understood() {
        match Layout::detect() {
            Ok(l) => eprintln!("layout: {l:?}"),
            Err(e) => assert!(
                std::env::var_os("CI").is_none(),
                "CI machine layout not understood: {e}"
            ),
        }
    }
}
