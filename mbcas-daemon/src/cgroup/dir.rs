//! Reading a cgroup's CPU bandwidth counters from the cgroup filesystem, v1 or v2.
//!
//! * v2: `cpu.stat` has `usage_usec`, `nr_periods`, `nr_throttled`, `throttled_usec`.
//! * v1: `cpu.stat` (cpu controller) has `nr_periods`, `nr_throttled`,
//!   `throttled_time` (ns); usage is `cpuacct.usage` (ns), in the same directory
//!   when cpu and cpuacct are co-mounted, else at the same relative path under the
//!   cpuacct hierarchy's mount point (found in `/proc/self/mountinfo`).
//!
//! Errors say which file and why; a directory that disappears between calls is
//! [`CgroupFsError::Vanished`], distinct from garbage.

use std::{
    io::ErrorKind,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use crate::units::CgroupId;

#[derive(Debug, thiserror::Error)]
pub enum CgroupFsError {
    #[error("{path}: no such cgroup")]
    NotFound { path: PathBuf },
    #[error("{path}: cgroup vanished")]
    Vanished { path: PathBuf },
    #[error("{path}: not a cgroup with the cpu controller (no cpu.stat)")]
    NotCpuCgroup { path: PathBuf },
    #[error("cannot read {path}")]
    Unreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Malformed { path: PathBuf, reason: String },
}

impl CgroupFsError {
    /// A short, bounded label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::NotFound { .. } => "not_found",
            Self::Vanished { .. } => "vanished",
            Self::NotCpuCgroup { .. } => "not_cpu_cgroup",
            Self::Unreadable { .. } => "unreadable",
            Self::Malformed { .. } => "malformed",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hierarchy {
    V1,
    V2,
}

/// Where a cgroup's counters live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupDir {
    pub path: PathBuf,
    pub id: CgroupId,
    pub hierarchy: Hierarchy,
    /// v1 only: the `cpuacct.usage` file, when the hierarchy has one.
    pub usage_file: Option<PathBuf>,
}

/// Cumulative counters, as `cpu.stat` reports them (times in ns).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuCounters {
    pub nr_periods: u64,
    pub nr_throttled: u64,
    pub throttled_ns: u64,
    pub usage_ns: Option<u64>,
}

/// Reads a cgroup file; a missing file means the cgroup vanished.
pub(crate) fn read_file(path: &Path) -> Result<String, CgroupFsError> {
    std::fs::read_to_string(path).map_err(|source| match source.kind() {
        ErrorKind::NotFound => CgroupFsError::Vanished {
            path: path.to_owned(),
        },
        _ => CgroupFsError::Unreadable {
            path: path.to_owned(),
            source,
        },
    })
}

impl CgroupDir {
    /// Resolves a cgroup directory: its id (inode) and hierarchy.
    pub fn open(path: &Path) -> Result<Self, CgroupFsError> {
        Self::open_with_mounts(path, &Mounts::read())
    }

    pub fn open_with_mounts(path: &Path, mounts: &Mounts) -> Result<Self, CgroupFsError> {
        let meta = std::fs::metadata(path).map_err(|source| match source.kind() {
            ErrorKind::NotFound => CgroupFsError::NotFound {
                path: path.to_owned(),
            },
            _ => CgroupFsError::Unreadable {
                path: path.to_owned(),
                source,
            },
        })?;
        if !meta.is_dir() || !path.join("cpu.stat").exists() {
            return Err(CgroupFsError::NotCpuCgroup {
                path: path.to_owned(),
            });
        }
        let id = CgroupId(meta.ino());
        if path.join("cpu.max").exists() {
            return Ok(Self {
                path: path.to_owned(),
                id,
                hierarchy: Hierarchy::V2,
                usage_file: None,
            });
        }
        let local = path.join("cpuacct.usage");
        let usage_file = if local.exists() {
            Some(local)
        } else {
            mounts.cpuacct_peer(path)
        };
        Ok(Self {
            path: path.to_owned(),
            id,
            hierarchy: Hierarchy::V1,
            usage_file,
        })
    }

    /// Reads the counters now.
    pub fn read(&self) -> Result<CpuCounters, CgroupFsError> {
        let stat_path = self.path.join("cpu.stat");
        let text = read_file(&stat_path)?;
        let mut c =
            parse_cpu_stat(&text, self.hierarchy).map_err(|reason| CgroupFsError::Malformed {
                path: stat_path.clone(),
                reason,
            })?;
        if self.hierarchy == Hierarchy::V1 {
            c.usage_ns = self.read_v1_usage()?;
        }
        Ok(c)
    }

    /// CPU usage only (ns), when the bandwidth counters come from elsewhere
    /// (the eBPF map): on v1 one read of `cpuacct.usage` instead of two files;
    /// on v2 usage lives in `cpu.stat`, which is read whole.
    pub fn read_usage(&self) -> Result<Option<u64>, CgroupFsError> {
        match self.hierarchy {
            Hierarchy::V1 => self.read_v1_usage(),
            Hierarchy::V2 => Ok(self.read()?.usage_ns),
        }
    }

    fn read_v1_usage(&self) -> Result<Option<u64>, CgroupFsError> {
        let Some(f) = &self.usage_file else {
            return Ok(None);
        };
        let t = read_file(f)?;
        t.trim()
            .parse()
            .map(Some)
            .map_err(|_| CgroupFsError::Malformed {
                path: f.clone(),
                reason: format!("expected a number of nanoseconds, got {:?}", t.trim()),
            })
    }
}

/// Parses `cpu.stat` text. Unknown keys are ignored; the bandwidth keys must be
/// present and numeric.
pub fn parse_cpu_stat(text: &str, hierarchy: Hierarchy) -> Result<CpuCounters, String> {
    let (mut periods, mut throttled, mut time, mut usage) = (None, None, None, None);
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let mut parts = line.split_whitespace();
        let (Some(key), Some(value), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(format!(
                "line {}: expected `key value`, got {line:?}",
                n + 1
            ));
        };
        let slot = match (hierarchy, key) {
            (_, "nr_periods") => &mut periods,
            (_, "nr_throttled") => &mut throttled,
            (Hierarchy::V1, "throttled_time") | (Hierarchy::V2, "throttled_usec") => &mut time,
            (Hierarchy::V2, "usage_usec") => &mut usage,
            _ => continue,
        };
        *slot = Some(
            value
                .parse::<u64>()
                .map_err(|_| format!("line {}: {key} is not a number: {value:?}", n + 1))?,
        );
    }
    let need = |v: Option<u64>, k: &str| v.ok_or_else(|| format!("missing {k}"));
    let us = |v: u64| v.saturating_mul(1000);
    Ok(match hierarchy {
        Hierarchy::V1 => CpuCounters {
            nr_periods: need(periods, "nr_periods")?,
            nr_throttled: need(throttled, "nr_throttled")?,
            throttled_ns: need(time, "throttled_time")?,
            usage_ns: None,
        },
        Hierarchy::V2 => CpuCounters {
            nr_periods: need(periods, "nr_periods")?,
            nr_throttled: need(throttled, "nr_throttled")?,
            throttled_ns: us(need(time, "throttled_usec")?),
            usage_ns: usage.map(us),
        },
    })
}

/// cgroup v1 mount points of the `cpu` and `cpuacct` controllers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Mounts {
    pub cpu: Option<PathBuf>,
    pub cpuacct: Option<PathBuf>,
}

impl Mounts {
    pub fn read() -> Self {
        std::fs::read_to_string("/proc/self/mountinfo")
            .map(|t| Self::parse(&t))
            .unwrap_or_default()
    }

    /// Parses `/proc/self/mountinfo`.
    pub fn parse(text: &str) -> Self {
        let mut m = Self::default();
        for line in text.lines() {
            let Some((left, right)) = line.split_once(" - ") else {
                continue;
            };
            let mount_point = left.split_whitespace().nth(4);
            let mut r = right.split_whitespace();
            let (Some(fstype), _source, Some(opts)) = (r.next(), r.next(), r.next()) else {
                continue;
            };
            if fstype != "cgroup" {
                continue;
            }
            let opts: Vec<&str> = opts.split(',').collect();
            if let Some(mp) = mount_point {
                if opts.contains(&"cpu") && m.cpu.is_none() {
                    m.cpu = Some(PathBuf::from(mp));
                }
                if opts.contains(&"cpuacct") && m.cpuacct.is_none() {
                    m.cpuacct = Some(PathBuf::from(mp));
                }
            }
        }
        m
    }

    /// The `cpuacct.usage` at the same relative path as `cpu_dir` under the cpuacct
    /// hierarchy, if it exists.
    pub fn cpuacct_peer(&self, cpu_dir: &Path) -> Option<PathBuf> {
        let rel = cpu_dir.strip_prefix(self.cpu.as_ref()?).ok()?;
        let f = self.cpuacct.as_ref()?.join(rel).join("cpuacct.usage");
        f.exists().then_some(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1: &str =
        "nr_periods 120\nnr_throttled 100\nthrottled_time 7990000000\nnr_bursts 0\nburst_time 0\n";
    const V2: &str = "usage_usec 2000\nuser_usec 1500\nsystem_usec 500\nnr_periods 10\nnr_throttled 9\nthrottled_usec 800\nnr_bursts 0\nburst_usec 0\n";

    #[test]
    fn parses_v1_and_v2() {
        let c = parse_cpu_stat(V1, Hierarchy::V1).unwrap();
        assert_eq!(
            (c.nr_periods, c.nr_throttled, c.throttled_ns),
            (120, 100, 7_990_000_000)
        );
        let c = parse_cpu_stat(V2, Hierarchy::V2).unwrap();
        assert_eq!(
            (c.nr_periods, c.nr_throttled, c.throttled_ns, c.usage_ns),
            (10, 9, 800_000, Some(2_000_000))
        );
    }

    #[test]
    fn garbage_is_rejected_with_the_line() {
        let e = parse_cpu_stat("nr_periods x\n", Hierarchy::V1)
            .err()
            .unwrap_or_default();
        assert!(e.contains("line 1") && e.contains("nr_periods"), "{e}");
        assert!(parse_cpu_stat("nr_periods 1\n", Hierarchy::V1).is_err());
        assert!(parse_cpu_stat("\u{0}\u{1}binary", Hierarchy::V2).is_err());
        assert!(parse_cpu_stat("a b c\n", Hierarchy::V2).is_err());
    }

    #[test]
    fn mountinfo_finds_v1_controllers() {
        let text = "30 25 0:26 / /sys/fs/cgroup/cpu rw,relatime shared:9 - cgroup cgroup rw,cpu\n\
                    31 25 0:27 / /sys/fs/cgroup/cpuacct rw,relatime shared:10 - cgroup cgroup rw,cpuacct\n\
                    40 25 0:35 / /sys/fs/cgroup/unified rw,relatime shared:11 - cgroup2 cgroup2 rw\n";
        let m = Mounts::parse(text);
        assert_eq!(m.cpu.as_deref(), Some(Path::new("/sys/fs/cgroup/cpu")));
        assert_eq!(
            m.cpuacct.as_deref(),
            Some(Path::new("/sys/fs/cgroup/cpuacct"))
        );
        let co = Mounts::parse(
            "30 25 0:26 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n",
        );
        assert_eq!(co.cpu, co.cpuacct);
    }

    #[test]
    fn fixture_dirs_v1_and_v2() {
        let tmp = tempfile::tempdir().unwrap();
        let v2 = tmp.path().join("v2");
        std::fs::create_dir_all(&v2).unwrap();
        std::fs::write(v2.join("cpu.stat"), V2).unwrap();
        std::fs::write(v2.join("cpu.max"), "20000 100000\n").unwrap();
        let d = CgroupDir::open(&v2).unwrap();
        assert_eq!(d.hierarchy, Hierarchy::V2);
        assert_eq!(d.read().map(|c| c.usage_ns).ok().flatten(), Some(2_000_000));
        assert_eq!(d.read_usage().unwrap(), Some(2_000_000));

        let cpu = tmp.path().join("cpu/g");
        let acct = tmp.path().join("cpuacct/g");
        for d in [&cpu, &acct] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(cpu.join("cpu.stat"), V1).unwrap();
        std::fs::write(acct.join("cpuacct.usage"), "123456\n").unwrap();
        let mounts = Mounts {
            cpu: Some(tmp.path().join("cpu")),
            cpuacct: Some(tmp.path().join("cpuacct")),
        };
        let d = CgroupDir::open_with_mounts(&cpu, &mounts).unwrap();
        assert_eq!(d.hierarchy, Hierarchy::V1);
        let c = d.read().unwrap();
        assert_eq!((c.nr_throttled, c.usage_ns), (100, Some(123_456)));

        assert_eq!(d.read_usage().unwrap(), Some(123_456));

        // Garbage, then the cgroup vanishing. Usage alone reads only cpuacct.usage.
        std::fs::write(cpu.join("cpu.stat"), "nr_periods lots\n").unwrap();
        assert!(matches!(d.read(), Err(CgroupFsError::Malformed { .. })));
        assert_eq!(d.read_usage().unwrap(), Some(123_456));
        std::fs::write(acct.join("cpuacct.usage"), "-1\n").unwrap();
        assert!(matches!(
            d.read_usage(),
            Err(CgroupFsError::Malformed { .. })
        ));
        std::fs::remove_dir_all(&acct).unwrap();
        assert!(matches!(
            d.read_usage(),
            Err(CgroupFsError::Vanished { .. })
        ));
        std::fs::remove_dir_all(&cpu).unwrap();
        assert!(matches!(d.read(), Err(CgroupFsError::Vanished { .. })));
        assert!(matches!(
            CgroupDir::open(&cpu),
            Err(CgroupFsError::NotFound { .. })
        ));
        assert!(matches!(
            CgroupDir::open(tmp.path()),
            Err(CgroupFsError::NotCpuCgroup { .. })
        ));
    }
}
