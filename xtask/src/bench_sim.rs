//! `cargo xtask bench-sim`: the simulator at cluster scale.
//!
//! Writes a scenario of `--nodes` nodes × `--pods` pods (a fixed mix of steady,
//! on/off, step and late-starting pods on 32-core nodes) for `--seconds`
//! simulated seconds to `target/bench-sim/scenario.json`, runs
//! `mbcas simulate --policy mbcas` on it (release build) and prints the wall
//! time and the peak RSS of that process.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

#[derive(Debug, clap::Args)]
pub struct Options {
    /// Simulated nodes.
    #[arg(long, default_value_t = 1000)]
    pub nodes: u32,
    /// Pods per node (a multiple of 11).
    #[arg(long, default_value_t = 110)]
    pub pods: u32,
    /// Simulated seconds.
    #[arg(long, default_value_t = 3600)]
    pub seconds: u32,
    /// Policy to run.
    #[arg(long, default_value = "mbcas")]
    pub policy: String,
}

fn scenario(o: &Options) -> serde_json::Value {
    let k = o.pods / 11;
    let half = f64::from(o.seconds) / 2.0;
    serde_json::json!({
        "name": format!("bench-{}x{}x{}s", o.nodes, o.pods, o.seconds),
        "duration_s": o.seconds,
        "nodes": [{"name": "node", "count": o.nodes, "capacity_m": 32000, "reserve": 0.1, "pods": [
            {"name": "web", "count": 5 * k, "request_m": 200, "limit_m": 400, "noise": 0.3,
             "demand": {"kind": "steady", "m": 250}},
            {"name": "api", "count": 3 * k, "request_m": 300, "limit_m": 600, "noise": 0.2,
             "demand": {"kind": "square", "on_m": 700, "off_m": 200, "on_s": 20, "off_s": 40}},
            {"name": "batch", "count": 2 * k, "request_m": 500, "limit_m": 1000, "noise": 0.1,
             "demand": {"kind": "step", "from_m": 300, "to_m": 900, "at_s": half}},
            {"name": "late", "count": k, "request_m": 100, "limit_m": 200, "noise": 0.3,
             "demand": {"kind": "start", "at_s": 600, "spike_m": 800, "spike_s": 60, "m": 150}}
        ]}]
    })
}

pub fn run(o: &Options) -> anyhow::Result<()> {
    if o.pods == 0 || !o.pods.is_multiple_of(11) {
        bail!("--pods must be a positive multiple of 11");
    }
    let dir = PathBuf::from("target/bench-sim");
    std::fs::create_dir_all(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
    let path = dir.join("scenario.json");
    std::fs::write(&path, serde_json::to_string_pretty(&scenario(o))?)
        .with_context(|| format!("write {}", path.display()))?;
    let bin = crate::host::build_mbcas(true)?;
    let t0 = Instant::now();
    let mut child = Command::new(&bin)
        .args(["simulate", "--json", "--policy", &o.policy, "--scenario"])
        .arg(&path)
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("run {}", bin.display()))?;
    // VmHWM (peak RSS) is a high-water mark: the last reading before exit is the peak.
    let status_path = format!("/proc/{}/status", child.id());
    let mut peak_kib = 0u64;
    let mut stdout = child.stdout.take().context("child stdout")?;
    let reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = std::io::Read::read_to_end(&mut stdout, &mut buf);
        buf
    });
    let status = loop {
        if let Ok(text) = std::fs::read_to_string(&status_path)
            && let Some(kib) = text
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        {
            peak_kib = peak_kib.max(kib);
        }
        if let Some(st) = child.try_wait()? {
            break st;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let wall = t0.elapsed();
    let stdout = reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader thread panicked"))?;
    if !status.success() {
        bail!("mbcas simulate failed: {status}");
    }
    let pod_periods = u64::from(o.nodes) * u64::from(o.pods) * u64::from(o.seconds) * 10;
    println!(
        "bench-sim: {} nodes × {} pods × {} s, policy {}",
        o.nodes, o.pods, o.seconds, o.policy
    );
    println!("  wall time     {:.1} s", wall.as_secs_f64());
    println!(
        "  peak RSS      {:.1} MiB (VmHWM)",
        peak_kib as f64 / 1024.0
    );
    println!(
        "  throughput    {:.1} M pod-periods/s",
        pod_periods as f64 / wall.as_secs_f64() / 1e6
    );
    let summary: serde_json::Value =
        serde_json::from_slice(&stdout).context("parse the simulator's --json output")?;
    println!("  result        {}", summary["policies"][&o.policy]);
    Ok(())
}
