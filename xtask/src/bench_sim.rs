//! `cargo xtask bench-sim`: the simulator at cluster scale.
//!
//! Writes a scenario of `--nodes` nodes × `--pods` pods (a fixed mix of steady,
//! on/off, step and late-starting pods on 32-core nodes) for `--seconds`
//! simulated seconds to `target/bench-sim/scenario.json`, runs
//! `mbcas simulate --policy mbcas` on it (release build) and prints the wall
//! time and the peak RSS of that process.
//!
//! `--cluster` benches the loop across nodes instead: `--nodes` 4-core nodes
//! with 6 pods each of two services, and a third stepping up on every tenth
//! node at a third of the run, `mbcas simulate-cluster` with the descheduler
//! evicting by `--algorithm` (`target/bench-sim/cluster.json`).

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
    /// The cluster case: the scheduler and the descheduler over `--nodes`
    /// nodes running MBCAS (`--pods` and `--policy` do not apply).
    #[arg(long)]
    pub cluster: bool,
    /// The node score the descheduler evicts by, in the cluster case.
    #[arg(long, default_value = "linear_amplified_ippd_k3")]
    pub algorithm: String,
}

/// `--nodes` 4-core nodes, 6 pods each (2.6 cores busy): `web` and `batch`
/// spread by the scheduler, then `search`'s 3 replicas on every tenth node
/// stepping up from 600 m to 3.6 cores there at a third of the run (one replica moved fits on any other node).
fn cluster_scenario(o: &Options) -> serde_json::Value {
    let n = o.nodes.max(1);
    let hot: Vec<String> = (0..n).step_by(10).map(|i| format!("n-{i}")).collect();
    let search = 3 * hot.len() as u32;
    serde_json::json!({
        "name": format!("bench-cluster-{}x{}s", n, o.seconds),
        "duration_s": o.seconds,
        "noise": 0.05,
        "nodes": [{"name": "n", "count": n, "cpu_m": 4000, "memory_mi": 16384}],
        "services": [
            {"name": "web", "replicas": 4 * n, "request_m": 200, "memory_mi": 512,
             "load": {"kind": "steady", "m": 1600 * n}},
            {"name": "batch", "replicas": 2 * n, "request_m": 500, "memory_mi": 1024,
             "load": {"kind": "steady", "m": 1000 * n}},
            {"name": "search", "replicas": search, "request_m": 250, "memory_mi": 512,
             "load": {"kind": "step", "from_m": 200 * search, "to_m": 1200 * search,
                      "at_s": o.seconds / 3},
             "on": hot}
        ]
    })
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
    if o.cluster {
        return run_cluster(o);
    }
    if o.pods == 0 || !o.pods.is_multiple_of(11) {
        bail!("--pods must be a positive multiple of 11");
    }
    let path = write_scenario("scenario.json", &scenario(o))?;
    let (wall, peak_kib, stdout) = measure(&[
        "simulate",
        "--json",
        "--policy",
        &o.policy,
        "--scenario",
        &path.display().to_string(),
    ])?;
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

fn run_cluster(o: &Options) -> anyhow::Result<()> {
    let path = write_scenario("cluster.json", &cluster_scenario(o))?;
    let (wall, peak_kib, stdout) = measure(&[
        "simulate-cluster",
        "--json",
        "--algorithm",
        &o.algorithm,
        "--scenario",
        &path.display().to_string(),
    ])?;
    let n = u64::from(o.nodes.max(1));
    let pods = 6 * n + 3 * n.div_ceil(10);
    println!(
        "bench-sim: cluster of {} nodes, {pods} pods, {} s, descheduler by {}",
        o.nodes, o.seconds, o.algorithm
    );
    println!("  wall time     {:.2} s", wall.as_secs_f64());
    println!(
        "  peak RSS      {:.1} MiB (VmHWM)",
        peak_kib as f64 / 1024.0
    );
    println!(
        "  throughput    {:.1} M pod-seconds/s",
        (pods * u64::from(o.seconds)) as f64 / wall.as_secs_f64() / 1e6
    );
    let runs: serde_json::Value =
        serde_json::from_slice(&stdout).context("parse the simulator's --json output")?;
    println!("  result        {}", runs[0]);
    Ok(())
}

fn write_scenario(name: &str, scenario: &serde_json::Value) -> anyhow::Result<PathBuf> {
    let dir = PathBuf::from("target/bench-sim");
    std::fs::create_dir_all(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
    let path = dir.join(name);
    std::fs::write(&path, serde_json::to_string_pretty(scenario)?)
        .with_context(|| format!("write {}", path.display()))?;
    Ok(path)
}

/// Runs the release `mbcas` with `args`: wall time, peak RSS (KiB) and its
/// standard output.
fn measure(args: &[&str]) -> anyhow::Result<(Duration, u64, Vec<u8>)> {
    let bin = crate::host::build_mbcas(true)?;
    let t0 = Instant::now();
    let mut child = Command::new(&bin)
        .args(args)
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
        bail!("mbcas {} failed: {status}", args.first().unwrap_or(&""));
    }
    Ok((wall, peak_kib, stdout))
}
