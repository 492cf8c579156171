//! The cgroup files MBCAS reads: `cpu.stat` (v1, v2), `cpu.max`,
//! `cpu.cfs_quota_us` + `cpu.cfs_period_us`, `cpu.weight` / `cpu.shares`,
//! `cpu.pressure` and `/proc/self/mountinfo`. The first byte picks the file.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mbcas::cgroup::{Hierarchy, Mounts, dir::parse_cpu_stat, files};

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    match which % 8 {
        0 => {
            let _ = parse_cpu_stat(text, Hierarchy::V1);
        }
        1 => {
            if let Ok(c) = parse_cpu_stat(text, Hierarchy::V2) {
                // v2 counts in µs: ns values are whole µs.
                assert_eq!(c.throttled_ns % 1000, 0, "{text:?}");
            }
        }
        2 => {
            if let Ok(q) = files::parse_cpu_max(text) {
                // What the writer would write reads back the same.
                let written = match q.quota_us {
                    Some(us) => format!("{us} {}", q.period_us),
                    None => format!("max {}", q.period_us),
                };
                assert_eq!(files::parse_cpu_max(&written), Ok(q), "{text:?}");
                let _ = q.millicores();
            }
        }
        3 => {
            let (quota, period) = text.split_once('\n').unwrap_or((text, ""));
            if let Ok(q) = files::parse_cfs(quota, period) {
                let _ = q.millicores();
            }
        }
        4 => {
            if let Ok(w) = files::parse_weight(text, Hierarchy::V2) {
                assert!((1.0..=10_000.0).contains(&w), "{text:?} → {w}");
            }
        }
        5 => {
            if let Ok(w) = files::parse_weight(text, Hierarchy::V1) {
                assert!(w.is_finite() && w > 0.0, "{text:?} → {w}");
            }
        }
        6 => {
            let _ = files::parse_pressure_some_ns(text);
        }
        _ => {
            let m = Mounts::parse(text);
            let _ = m.cpuacct_peer(std::path::Path::new("/sys/fs/cgroup/cpu/x"));
        }
    }
});
