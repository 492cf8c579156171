//! `cargo xtask bench-sensor`: the eBPF sensor's cost and latency on this machine.
//!
//! For each scenario (idle; 10 and 100 throttled cgroups, one spinning process
//! each under a tight quota) it runs `mbcas sense --json` over all the cgroups with
//! `kernel.bpf_stats_enabled=1` and prints: per-program calls and ns per call,
//! events per second, ring-buffer and user-space drops, event latency (kernel →
//! user space), and the CPU share and peak RSS of `mbcas sense` itself. Needs
//! root and cgroup v1 `cpu`/`cpuacct` or cgroup v2. Cleans up its cgroups and
//! processes, also on failure.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use anyhow::{Context as _, bail};
use serde_json::Value;

#[derive(Debug, clap::Args)]
pub struct Options {
    /// Seconds per scenario (the 100-cgroup run uses this too).
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
}

struct Bench {
    dirs: Vec<PathBuf>,
    children: Vec<Child>,
    stats_was: Option<String>,
}

impl Drop for Bench {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for d in self.dirs.iter().rev() {
            for _ in 0..50 {
                if std::fs::remove_dir(d).is_ok() || !d.exists() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
        if let Some(v) = &self.stats_was {
            let _ = std::fs::write(STATS, v);
        }
    }
}

const STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl Bench {
    /// `n` cgroups, each with one spinning process limited to `millicores`.
    fn throttled(&mut self, tag: &str, n: usize, millicores: u64) -> anyhow::Result<Vec<PathBuf>> {
        let crate::host::CgroupRoots {
            cpu,
            cpuacct: acct,
            v2,
        } = crate::host::CgroupRoots::detect()?;
        let mut out = Vec::new();
        for i in 0..n {
            let name = format!("mbcas-bench-{tag}-{}-{i}", std::process::id());
            let dir = cpu.join(&name);
            std::fs::create_dir(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
            self.dirs.push(dir.clone());
            let adir = acct.as_ref().map(|a| a.join(&name));
            if let Some(a) = &adir {
                std::fs::create_dir(a).with_context(|| format!("mkdir {}", a.display()))?;
                self.dirs.push(a.clone());
            }
            if v2 {
                std::fs::write(dir.join("cpu.max"), format!("{} 100000", millicores * 100))?;
            } else {
                std::fs::write(dir.join("cpu.cfs_quota_us"), (millicores * 100).to_string())?;
            }
            let child = Command::new("sh")
                .args(["-c", "while :; do :; done"])
                .stdin(Stdio::null())
                .spawn()
                .context("spawn burner")?;
            let pid = child.id().to_string();
            self.children.push(child);
            std::fs::write(dir.join("cgroup.procs"), &pid)?;
            if let Some(a) = &adir {
                std::fs::write(a.join("cgroup.procs"), &pid)?;
            }
            out.push(dir);
        }
        Ok(out)
    }
}

fn sense(bin: &Path, cgroups: &[PathBuf], seconds: u64) -> anyhow::Result<Value> {
    let mut cmd = Command::new(bin);
    cmd.args([
        "--log-level",
        "warn",
        "sense",
        "--json",
        "--sensor",
        "ebpf",
        "--duration",
    ])
    .arg(seconds.to_string());
    for c in cgroups {
        cmd.arg("--cgroup").arg(c);
    }
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .context("run mbcas sense")?;
    if !out.status.success() {
        bail!("mbcas sense failed: {}", out.status);
    }
    serde_json::from_slice(&out.stdout).context("sense output is not JSON")
}

fn report(name: &str, v: &Value, seconds: u64) {
    let f = |p: &str| v.pointer(p).and_then(Value::as_f64).unwrap_or(f64::NAN);
    println!("== {name}");
    for p in v["programs"].as_array().into_iter().flatten() {
        let calls = p["run_count"].as_f64().unwrap_or(0.0);
        let ns = p["run_time_ns"].as_f64().unwrap_or(0.0);
        println!(
            "  {:<20} {:>10.0} calls/s  {:>6.0} ns/call",
            p["name"].as_str().unwrap_or("?"),
            calls / seconds as f64,
            if calls > 0.0 { ns / calls } else { 0.0 }
        );
    }
    println!(
        "  events {:.0}/s, ring-buffer drops {}, user drops {}, read errors {}",
        f("/kernel/events") / seconds as f64,
        f("/kernel/ringbuf_drops"),
        f("/kernel/user_drops"),
        f("/kernel/read_errors")
    );
    println!(
        "  event latency p50 {:.0} µs, p99 {:.0} µs, max {:.0} µs ({} events)",
        f("/event_latency_us/p50"),
        f("/event_latency_us/p99"),
        f("/event_latency_us/max"),
        f("/event_latency_us/n")
    );
    println!(
        "  mbcas sense: {:.2} % of one core, peak RSS {:.1} MiB",
        f("/resources/cpu_s") / seconds as f64 * 100.0,
        f("/resources/max_rss_kib") / 1024.0
    );
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    let bin = crate::host::build_mbcas(true)?;
    let mut b = Bench {
        dirs: Vec::new(),
        children: Vec::new(),
        stats_was: std::fs::read_to_string(STATS).ok(),
    };
    std::fs::write(STATS, "1").context("enable kernel.bpf_stats_enabled (needs root)")?;

    let idle = b.throttled("idle", 1, 1000)?;
    // The one group is not throttled: a spinner under a whole core would be, so stop it.
    for c in &mut b.children {
        let _ = c.kill();
        let _ = c.wait();
    }
    b.children.clear();
    let secs = opts.seconds.min(10);
    report(
        "idle (no throttled cgroup)",
        &sense(&bin, &idle, secs)?,
        secs,
    );

    let ten = b.throttled("ten", 10, 50)?;
    report(
        "10 throttled cgroups (50 m each)",
        &sense(&bin, &ten, secs)?,
        secs,
    );
    for c in &mut b.children {
        let _ = c.kill();
        let _ = c.wait();
    }
    b.children.clear();

    let hundred = b.throttled("hundred", 100, 10)?;
    report(
        &format!("100 throttled cgroups (10 m each), {} s", opts.seconds),
        &sense(&bin, &hundred, opts.seconds)?,
        opts.seconds,
    );
    Ok(())
}
