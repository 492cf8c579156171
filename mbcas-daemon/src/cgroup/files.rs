//! Limits, weights and pressure in cgroup files, for v1 and v2.
//!
//! | what | v1 (`cpu` controller) | v2 |
//! | --- | --- | --- |
//! | quota | `cpu.cfs_quota_us` (`-1` = none) + `cpu.cfs_period_us` | `cpu.max` (`max 100000` = none) |
//! | weight | `cpu.shares` (2…262144, default 1024) | `cpu.weight` (1…10000, default 100) |
//! | pressure | — | `cpu.pressure` (`some avg10=… total=µs`) |

use std::{io::ErrorKind, path::Path};

use super::{CgroupFsError, Hierarchy, dir::read_file as read};
use crate::units::MilliCpu;

/// A CFS bandwidth limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quota {
    /// `None`: unlimited.
    pub quota_us: Option<u64>,
    pub period_us: u64,
}

impl Quota {
    pub const DEFAULT_PERIOD_US: u64 = 100_000;

    /// The CPU amount the quota grants (`None`: unlimited).
    pub fn millicores(&self) -> Option<MilliCpu> {
        self.quota_us
            .map(|q| MilliCpu::from_quota_us(q, self.period_us))
    }

    pub fn from_millicores(m: MilliCpu, period_us: u64) -> Self {
        // The kernel refuses quotas under 1 ms.
        Self {
            quota_us: Some(m.to_quota_us(period_us).max(1000)),
            period_us,
        }
    }
}

fn write(path: &Path, value: &str) -> Result<(), CgroupFsError> {
    std::fs::write(path, value).map_err(|source| match source.kind() {
        ErrorKind::NotFound => CgroupFsError::Vanished {
            path: path.to_owned(),
        },
        _ => CgroupFsError::Unreadable {
            path: path.to_owned(),
            source,
        },
    })
}

fn malformed(path: &Path, reason: impl Into<String>) -> CgroupFsError {
    CgroupFsError::Malformed {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

fn number(path: &Path, s: &str) -> Result<i64, CgroupFsError> {
    parse_number(s).map_err(|reason| malformed(path, reason))
}

fn parse_number(s: &str) -> Result<i64, String> {
    s.trim()
        .parse::<i64>()
        .map_err(|_| format!("expected a number, got {:?}", s.trim()))
}

/// Parses v2's `cpu.max` (`QUOTA PERIOD`, `max PERIOD` = unlimited).
pub fn parse_cpu_max(text: &str) -> Result<Quota, String> {
    let mut it = text.split_whitespace();
    let (Some(q), Some(p), None) = (it.next(), it.next(), it.next()) else {
        return Err(format!("expected `QUOTA PERIOD`, got {:?}", text.trim()));
    };
    let period_us = u64::try_from(parse_number(p)?).map_err(|_| "negative period".to_owned())?;
    let quota_us = if q == "max" {
        None
    } else {
        Some(u64::try_from(parse_number(q)?).map_err(|_| "negative quota".to_owned())?)
    };
    Ok(Quota {
        quota_us,
        period_us,
    })
}

/// Parses v1's `cpu.cfs_quota_us` (`-1` = unlimited) and `cpu.cfs_period_us`.
pub fn parse_cfs(quota: &str, period: &str) -> Result<Quota, String> {
    let q = parse_number(quota).map_err(|e| format!("cpu.cfs_quota_us: {e}"))?;
    let p = parse_number(period).map_err(|e| format!("cpu.cfs_period_us: {e}"))?;
    let period_us =
        u64::try_from(p).map_err(|_| "cpu.cfs_period_us: negative period".to_owned())?;
    Ok(Quota {
        quota_us: u64::try_from(q).ok(),
        period_us,
    })
}

/// Parses `cpu.weight` (v2, 1…10000) or `cpu.shares` (v1, ≥ 2) into v2's scale.
pub fn parse_weight(text: &str, h: Hierarchy) -> Result<f64, String> {
    let w = parse_number(text)?;
    match h {
        Hierarchy::V2 if (1..=10_000).contains(&w) => Ok(w as f64),
        Hierarchy::V2 => Err(format!("weight {w} outside 1…10000")),
        Hierarchy::V1 if w >= 2 => Ok(w as f64 * 100.0 / 1024.0),
        Hierarchy::V1 => Err(format!("shares {w} below 2")),
    }
}

/// Parses `cpu.pressure`: the `some` line's `total=` (µs), in ns.
pub fn parse_pressure_some_ns(text: &str) -> Result<u64, String> {
    let line = text
        .lines()
        .find(|l| l.starts_with("some "))
        .ok_or("no `some` line")?;
    let total = line
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("total="))
        .ok_or("no total= in the `some` line")?;
    let us: u64 = total
        .parse()
        .map_err(|_| format!("total={total} is not a number"))?;
    Ok(us.saturating_mul(1000))
}

/// Reads a cgroup's CFS quota.
pub fn read_quota(dir: &Path, h: Hierarchy) -> Result<Quota, CgroupFsError> {
    match h {
        Hierarchy::V2 => {
            let path = dir.join("cpu.max");
            parse_cpu_max(&read(&path)?).map_err(|reason| malformed(&path, reason))
        }
        Hierarchy::V1 => {
            let qp = dir.join("cpu.cfs_quota_us");
            let pp = dir.join("cpu.cfs_period_us");
            let (q, p) = (read(&qp)?, read(&pp)?);
            parse_cfs(&q, &p).map_err(|reason| malformed(dir, reason))
        }
    }
}

/// Writes a cgroup's CFS quota (keeping the period it has on v1).
pub fn write_quota(dir: &Path, h: Hierarchy, q: Quota) -> Result<(), CgroupFsError> {
    match h {
        Hierarchy::V2 => {
            let v = match q.quota_us {
                Some(us) => format!("{us} {}", q.period_us),
                None => format!("max {}", q.period_us),
            };
            write(&dir.join("cpu.max"), &v)
        }
        Hierarchy::V1 => {
            let pp = dir.join("cpu.cfs_period_us");
            let current = number(&pp, &read(&pp)?)?;
            if u64::try_from(current).ok() != Some(q.period_us) {
                write(&pp, &q.period_us.to_string())?;
            }
            let v = q
                .quota_us
                .map_or_else(|| "-1".to_owned(), |us| us.to_string());
            write(&dir.join("cpu.cfs_quota_us"), &v)
        }
    }
}

/// A cgroup's CPU weight, normalised to v2's scale (default 100).
pub fn read_weight(dir: &Path, h: Hierarchy) -> Result<f64, CgroupFsError> {
    let path = dir.join(match h {
        Hierarchy::V2 => "cpu.weight",
        Hierarchy::V1 => "cpu.shares",
    });
    parse_weight(&read(&path)?, h).map_err(|reason| malformed(&path, reason))
}

/// Writes a cgroup's CPU weight given in v2's scale (`cpu.weight` 1…10000, or
/// `cpu.shares` = weight × 1024 / 100, at least 2, on v1). Returns the weight
/// written, in v2's scale.
pub fn write_weight(dir: &Path, h: Hierarchy, weight: f64) -> Result<f64, CgroupFsError> {
    let w = if weight.is_finite() { weight } else { 100.0 };
    match h {
        Hierarchy::V2 => {
            let v = w.round().clamp(1.0, 10_000.0) as u64;
            write(&dir.join("cpu.weight"), &v.to_string())?;
            Ok(v as f64)
        }
        Hierarchy::V1 => {
            let v = (w * 1024.0 / 100.0).round().clamp(2.0, 262_144.0) as u64;
            write(&dir.join("cpu.shares"), &v.to_string())?;
            Ok(v as f64 * 100.0 / 1024.0)
        }
    }
}

/// Total `some` stall time from `cpu.pressure`, in ns (`None` where the file
/// does not exist, e.g. cgroup v1).
pub fn read_pressure_some_ns(dir: &Path) -> Result<Option<u64>, CgroupFsError> {
    let path = dir.join("cpu.pressure");
    let text = match read(&path) {
        Ok(t) => t,
        Err(CgroupFsError::Vanished { .. }) => return Ok(None),
        Err(e) => return Err(e),
    };
    parse_pressure_some_ns(&text)
        .map(Some)
        .map_err(|reason| malformed(&path, reason))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    fn put(d: &Path, f: &str, v: &str) {
        std::fs::write(d.join(f), v).unwrap();
    }

    #[test]
    fn quota_v2_round_trip() {
        let d = dir();
        put(d.path(), "cpu.max", "max 100000\n");
        let q = read_quota(d.path(), Hierarchy::V2).unwrap();
        assert_eq!((q.quota_us, q.millicores()), (None, None));
        write_quota(
            d.path(),
            Hierarchy::V2,
            Quota::from_millicores(MilliCpu(250), 100_000),
        )
        .unwrap();
        let q = read_quota(d.path(), Hierarchy::V2).unwrap();
        assert_eq!(q.millicores(), Some(MilliCpu(250)));
        put(d.path(), "cpu.max", "lots 100000\n");
        assert!(matches!(
            read_quota(d.path(), Hierarchy::V2),
            Err(CgroupFsError::Malformed { .. })
        ));
        put(d.path(), "cpu.max", "max\n");
        assert!(read_quota(d.path(), Hierarchy::V2).is_err());
    }

    #[test]
    fn quota_v1_round_trip() {
        let d = dir();
        put(d.path(), "cpu.cfs_quota_us", "-1\n");
        put(d.path(), "cpu.cfs_period_us", "100000\n");
        assert_eq!(
            read_quota(d.path(), Hierarchy::V1)
                .ok()
                .and_then(|q| q.millicores()),
            None
        );
        write_quota(
            d.path(),
            Hierarchy::V1,
            Quota::from_millicores(MilliCpu(1500), 100_000),
        )
        .unwrap();
        assert_eq!(
            std::fs::read_to_string(d.path().join("cpu.cfs_quota_us"))
                .ok()
                .as_deref(),
            Some("150000")
        );
        assert_eq!(
            read_quota(d.path(), Hierarchy::V1)
                .ok()
                .and_then(|q| q.millicores()),
            Some(MilliCpu(1500))
        );
        // Tiny quotas are raised to the kernel's 1 ms minimum.
        assert_eq!(
            Quota::from_millicores(MilliCpu(1), 100_000).quota_us,
            Some(1000)
        );
    }

    #[test]
    fn weights_normalised_to_v2_scale() {
        let d = dir();
        put(d.path(), "cpu.shares", "2048\n");
        put(d.path(), "cpu.weight", "300\n");
        assert_eq!(read_weight(d.path(), Hierarchy::V1).ok(), Some(200.0));
        assert_eq!(read_weight(d.path(), Hierarchy::V2).ok(), Some(300.0));
        put(d.path(), "cpu.weight", "0\n");
        assert!(read_weight(d.path(), Hierarchy::V2).is_err());
        assert!(matches!(
            read_weight(&d.path().join("gone"), Hierarchy::V1),
            Err(CgroupFsError::Vanished { .. })
        ));
    }

    #[test]
    fn pressure() {
        let d = dir();
        assert_eq!(read_pressure_some_ns(d.path()).ok(), Some(None));
        put(
            d.path(),
            "cpu.pressure",
            "some avg10=1.00 avg60=0.50 avg300=0.10 total=123456\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n",
        );
        assert_eq!(
            read_pressure_some_ns(d.path()).ok(),
            Some(Some(123_456_000))
        );
        put(d.path(), "cpu.pressure", "garbage\n");
        assert!(read_pressure_some_ns(d.path()).is_err());
    }
}
