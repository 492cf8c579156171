//! The whole node's CPU and memory as `/proc` tells them: what a node score
//! across nodes needs besides MBCAS's own market figures.
//!
//! | what | file | exported as |
//! | --- | --- | --- |
//! | CPU busy time | `/proc/stat`, first line: all but `idle` and `iowait` (USER_HZ = 100 ticks a second, fixed by the kernel's ABI) | `mbcas_node_cpu_busy_seconds_total` |
//! | CPUs | `/proc/stat`, the `cpuN` lines | `mbcas_node_cpus` |
//! | CPU pressure | `/proc/pressure/cpu`, `some` total | `mbcas_node_cpu_pressure_seconds_total` |
//! | memory in use | `/proc/meminfo`: 1 − `MemAvailable` ÷ `MemTotal` | `mbcas_node_memory_usage_ratio` |
//! | memory pressure | `/proc/pressure/memory`, `some` total | `mbcas_node_memory_pressure_seconds_total` |
//!
//! `/proc/stat`, `/proc/meminfo` and `/proc/pressure` are the host's inside a
//! container (they are not namespaced). A file that cannot be read or parsed
//! leaves its series where they were: PSI is absent on kernels built or
//! booted without it, and the daemon goes on without it.

use std::path::{Path, PathBuf};

use crate::{cgroup::files::parse_pressure_some_ns, metrics::Metrics};

/// Ticks a second in `/proc/stat` (USER_HZ, the same on every architecture
/// Kubernetes runs on).
const USER_HZ: f64 = 100.0;

/// The first line of `/proc/stat`: the node's busy time, in seconds, and the
/// number of CPUs (its `cpuN` lines).
pub fn parse_stat(text: &str) -> Result<(f64, usize), String> {
    let mut lines = text.lines();
    let first = lines.next().ok_or("empty")?;
    let mut fields = first.split_whitespace();
    if fields.next() != Some("cpu") {
        return Err(format!("the first line is not the `cpu` total: {first:?}"));
    }
    let ticks: Vec<u64> = fields
        .map(|f| f.parse().map_err(|_| format!("{f:?} is not a number")))
        .collect::<Result<_, _>>()?;
    // user nice system idle iowait irq softirq steal [guest guest_nice]:
    // guest time is counted in user time already.
    if ticks.len() < 8 {
        return Err(format!(
            "{} fields in the `cpu` line, 8 or more expected",
            ticks.len()
        ));
    }
    let busy: u64 = ticks[..8]
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, t)| t)
        .sum();
    let cpus = text
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .next()
                .and_then(|f| f.strip_prefix("cpu"))
                .is_some_and(|n| n.parse::<u32>().is_ok())
        })
        .count();
    if cpus == 0 {
        return Err("no `cpuN` line".into());
    }
    Ok((busy as f64 / USER_HZ, cpus))
}

/// The share of the node's memory in use, from `/proc/meminfo`:
/// 1 − MemAvailable ÷ MemTotal.
pub fn parse_meminfo(text: &str) -> Result<f64, String> {
    let field = |name: &str| -> Result<f64, String> {
        let line = text
            .lines()
            .find(|l| l.split(':').next() == Some(name))
            .ok_or_else(|| format!("no {name}"))?;
        line.split_whitespace()
            .nth(1)
            .and_then(|v| v.parse::<f64>().ok())
            .ok_or_else(|| format!("{name}: {line:?} has no number"))
    };
    let total = field("MemTotal")?;
    if total <= 0.0 {
        return Err("MemTotal is 0".into());
    }
    Ok((1.0 - field("MemAvailable")? / total).clamp(0.0, 1.0))
}

/// Reads the node's files each round and exports what changed.
#[derive(Debug)]
pub struct NodeStats {
    proc: PathBuf,
    /// The last readings of the cumulative figures: busy seconds, CPU and
    /// memory PSI `some` totals (ns).
    busy_s: Option<f64>,
    cpu_psi: Option<u64>,
    memory_psi: Option<u64>,
}

impl NodeStats {
    /// Reads under `/proc`.
    pub fn new() -> Self {
        Self::under("/proc")
    }

    /// Reads under `proc` (a test's fake `/proc`).
    pub fn under(proc: impl AsRef<Path>) -> Self {
        Self {
            proc: proc.as_ref().to_path_buf(),
            busy_s: None,
            cpu_psi: None,
            memory_psi: None,
        }
    }

    fn read(&self, rel: &str) -> Option<String> {
        std::fs::read_to_string(self.proc.join(rel)).ok()
    }

    /// One round: counters grow by what the files grew by since the last
    /// round (nothing at the first reading), gauges take the files' values.
    pub fn export(&mut self, m: &Metrics) {
        if let Some((busy, cpus)) = self.read("stat").and_then(|t| parse_stat(&t).ok()) {
            m.set_node_cpus(cpus);
            if let Some(before) = self.busy_s {
                m.add_node_cpu_busy((busy - before).max(0.0));
            }
            self.busy_s = Some(busy);
        }
        if let Some(used) = self.read("meminfo").and_then(|t| parse_meminfo(&t).ok()) {
            m.set_node_memory_usage(used);
        }
        let psi = |rel: &str| self.read(rel).and_then(|t| parse_pressure_some_ns(&t).ok());
        let (cpu, memory) = (psi("pressure/cpu"), psi("pressure/memory"));
        if let (Some(before), Some(now)) = (self.cpu_psi, cpu) {
            m.add_node_cpu_pressure(now.saturating_sub(before) as f64 / 1e9);
        }
        if let (Some(before), Some(now)) = (self.memory_psi, memory) {
            m.add_node_memory_pressure(now.saturating_sub(before) as f64 / 1e9);
        }
        (self.cpu_psi, self.memory_psi) = (cpu, memory);
    }
}

impl Default for NodeStats {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str = "cpu  1000 50 300 9000 100 20 30 0 400 0\n\
        cpu0 500 25 150 4500 50 10 15 0 200 0\n\
        cpu1 500 25 150 4500 50 10 15 0 200 0\n\
        intr 12345\nctxt 678\n";

    #[test]
    fn busy_time_leaves_out_idle_and_iowait_and_guest() {
        // user 1000 + nice 50 + system 300 + irq 20 + softirq 30 + steal 0.
        assert_eq!(parse_stat(STAT), Ok((14.0, 2)));
        assert!(parse_stat("intr 1\n").is_err());
        assert!(
            parse_stat("cpu 1 2 3\ncpu0 1 2 3\n").is_err(),
            "too few fields"
        );
        assert!(parse_stat("cpu 1 2 3 4 5 6 7 x\n").is_err());
        assert!(parse_stat("cpu 1 2 3 4 5 6 7 8\n").is_err(), "no cpuN line");
    }

    #[test]
    fn memory_in_use_is_what_is_not_available() {
        let text = "MemTotal:       8000 kB\nMemFree:        1000 kB\nMemAvailable:   2000 kB\n";
        assert_eq!(parse_meminfo(text), Ok(0.75));
        assert!(parse_meminfo("MemTotal: 8000 kB\n").is_err());
        assert!(parse_meminfo("MemTotal: 0 kB\nMemAvailable: 0 kB\n").is_err());
        assert!(parse_meminfo("MemTotal: x kB\nMemAvailable: 1 kB\n").is_err());
    }

    #[test]
    fn counters_grow_by_the_difference_and_missing_files_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        std::fs::create_dir(p.join("pressure")).unwrap();
        let write = |rel: &str, text: &str| std::fs::write(p.join(rel), text).unwrap();
        write("stat", STAT);
        write("meminfo", "MemTotal: 100 kB\nMemAvailable: 40 kB\n");
        write(
            "pressure/cpu",
            "some avg10=0.00 avg60=0.00 avg300=0.00 total=1000000\n",
        );
        write(
            "pressure/memory",
            "some avg10=0.00 avg60=0.00 avg300=0.00 total=500000\n",
        );
        let m = Metrics::new();
        let mut s = NodeStats::under(p);
        s.export(&m);
        let text = m.encode().unwrap();
        let value = |text: &str, name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{name} ")))
                .and_then(|v| v.parse::<f64>().ok())
        };
        assert_eq!(value(&text, "mbcas_node_cpus"), Some(2.0));
        assert_eq!(value(&text, "mbcas_node_memory_usage_ratio"), Some(0.6));
        assert_eq!(value(&text, "mbcas_node_cpu_busy_seconds_total"), Some(0.0));
        // 2.5 s busier, 2 s of CPU and 0.5 s of memory pressure later.
        write(
            "stat",
            "cpu  1200 50 350 9100 100 20 30 0 400 0\ncpu0 1\ncpu1 1\n",
        );
        write(
            "pressure/cpu",
            "some avg10=0.00 avg60=0.00 avg300=0.00 total=3000000\n",
        );
        write(
            "pressure/memory",
            "some avg10=0.00 avg60=0.00 avg300=0.00 total=1000000\n",
        );
        s.export(&m);
        let text = m.encode().unwrap();
        assert_eq!(value(&text, "mbcas_node_cpu_busy_seconds_total"), Some(2.5));
        assert_eq!(
            value(&text, "mbcas_node_cpu_pressure_seconds_total"),
            Some(2.0)
        );
        assert_eq!(
            value(&text, "mbcas_node_memory_pressure_seconds_total"),
            Some(0.5)
        );
        // Files gone (a kernel without PSI, a broken /proc): nothing moves.
        std::fs::remove_dir_all(p.join("pressure")).unwrap();
        write("meminfo", "garbage\n");
        s.export(&m);
        let again = m.encode().unwrap();
        assert_eq!(value(&again, "mbcas_node_memory_usage_ratio"), Some(0.6));
        assert_eq!(
            value(&again, "mbcas_node_cpu_pressure_seconds_total"),
            Some(2.0)
        );
    }
}
