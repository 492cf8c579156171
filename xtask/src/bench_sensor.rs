//! `cargo xtask bench-sensor`: the eBPF sensor's cost and latency on this machine.
//!
//! For each scenario (idle; 10 and 100 throttled cgroups, one spinning process
//! each under a tight quota) it runs `mbcas sense --json` over all the cgroups with
//! `kernel.bpf_stats_enabled=1` and prints: per-program calls and ns per call
//! (in the idle run also `mbcas_floor`, an empty program on the same hook: what
//! any program there costs), events per second, ring-buffer and user-space
//! drops, event latency (kernel → user space), and the CPU share (in the
//! window, start-up apart) and RSS of `mbcas sense` itself.
//!
//! A last scenario measures run-queue wait (100 busy cgroups without a binding
//! quota): the eBPF program against the sum of `/proc/<tid>/schedstat` polled
//! at the same time, per-cgroup error and both sensors' CPU, and
//! `mbcas_runq_wait`'s cost per call against `mbcas_switch_floor`.
//!
//! `--compare` runs, on the same `--cgroups` cgroups and the same load, the
//! eBPF sensor (counters read every 1 s, the daemon's tick) and the poll source
//! reading `cpu.stat` every 1 s (as koordlet) and every 100 ms (as
//! Autothrottle), and prints for each: total CPU (kernel programs from
//! `bpf_stats` plus user space, in the window), detection latency p50/p99 from
//! a burner's start in its cgroup to `mbcas sense` knowing the cgroup is
//! throttled, and RSS. Needs root and cgroup v1 `cpu`/`cpuacct` or cgroup v2.
//! Cleans up its cgroups and processes, also on failure.

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use anyhow::{Context as _, bail};
use serde_json::Value;

#[derive(Debug, clap::Args)]
pub struct Options {
    /// Seconds per scenario (the 100-cgroup run uses this too).
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// Compare MBCAS with cpu.stat pollers at 1 s and 100 ms instead.
    #[arg(long)]
    pub compare: bool,
    /// Throttled cgroups in the comparison (10 m each).
    #[arg(long, default_value_t = 100)]
    pub cgroups: usize,
}

struct Bench {
    dirs: Vec<PathBuf>,
    children: Vec<Child>,
    stats_was: Option<String>,
}

impl Drop for Bench {
    fn drop(&mut self) {
        self.stop_burners();
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
        let groups = self.cgroups(tag, n, millicores)?;
        for g in &groups {
            self.burn_in(g)?;
        }
        Ok(groups.into_iter().map(|g| g.cpu).collect())
    }

    /// Starts a spinning process in `g`; CLOCK_MONOTONIC (ns) once it is in.
    fn burn_in(&mut self, g: &Group) -> anyhow::Result<u64> {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "while :; do :; done"]);
        self.run_in(g, cmd)
    }

    /// Starts `cmd` in `g`; CLOCK_MONOTONIC (ns) once it is in.
    fn run_in(&mut self, g: &Group, mut cmd: Command) -> anyhow::Result<u64> {
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .context("spawn burner")?;
        let pid = child.id().to_string();
        self.children.push(child);
        if let Some(a) = &g.cpuacct {
            std::fs::write(a.join("cgroup.procs"), &pid)?;
        }
        std::fs::write(g.cpu.join("cgroup.procs"), &pid)?;
        monotonic_ns()
    }

    fn stop_burners(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.children.clear();
    }

    /// `n` empty cgroups limited to `millicores` each.
    fn cgroups(&mut self, tag: &str, n: usize, millicores: u64) -> anyhow::Result<Vec<Group>> {
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
            out.push(Group {
                cpu: dir,
                cpuacct: adir,
            });
        }
        Ok(out)
    }
}

struct Group {
    cpu: PathBuf,
    cpuacct: Option<PathBuf>,
}

/// CLOCK_MONOTONIC in ns: the clock `mbcas sense` stamps onsets with.
fn monotonic_ns() -> anyhow::Result<u64> {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)?;
    Ok(u64::try_from(t.tv_sec())? * 1_000_000_000 + u64::try_from(t.tv_nsec())?)
}

fn sense_cmd(bin: &Path, sensor: &str, cgroups: &[PathBuf], seconds: u64) -> Command {
    let mut cmd = Command::new(bin);
    cmd.args([
        "--log-level",
        "warn",
        "sense",
        "--json",
        "--sensor",
        sensor,
        "--duration",
    ])
    .arg(seconds.to_string());
    for c in cgroups {
        cmd.arg("--cgroup").arg(c);
    }
    cmd
}

fn sense(bin: &Path, cgroups: &[PathBuf], seconds: u64, floor: bool) -> anyhow::Result<Value> {
    let mut cmd = sense_cmd(bin, "ebpf", cgroups, seconds);
    if floor {
        cmd.arg("--floor");
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
        "  mbcas sense: {:.2} % of one core in the window (start-up {:.2} s CPU), RSS {:.1} MiB, peak {:.1} MiB",
        f("/window/cpu_s") / seconds as f64 * 100.0,
        f("/resources/cpu_s") - f("/window/cpu_s"),
        f("/window/rss_kib") / 1024.0,
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
    if opts.compare {
        return compare(&mut b, &bin, opts);
    }

    let idle = b.throttled("idle", 1, 1000)?;
    // The one group is not throttled: a spinner under a whole core would be, so stop it.
    b.stop_burners();
    let secs = opts.seconds.min(10);
    report(
        "idle (no throttled cgroup)",
        &sense(&bin, &idle, secs, true)?,
        secs,
    );

    let ten = b.throttled("ten", 10, 50)?;
    report(
        "10 throttled cgroups (50 m each)",
        &sense(&bin, &ten, secs, false)?,
        secs,
    );
    b.stop_burners();

    let hundred = b.throttled("hundred", 100, 10)?;
    report(
        &format!("100 throttled cgroups (10 m each), {} s", opts.seconds),
        &sense(&bin, &hundred, opts.seconds, false)?,
        opts.seconds,
    );
    b.stop_burners();
    runqueue(&mut b, &bin, opts.seconds)
}

/// Run-queue wait: 100 busy cgroups with no binding quota (one `mbcas burn`
/// at 30 m each: 3 cores wanted of 2, so every group waits), sensed at once by
/// the eBPF program (with the empty `mbcas_switch_floor` beside it) and by the
/// poll source summing `/proc/<tid>/schedstat` every second; per-cgroup wait
/// compared, costs printed. The accuracy goal is ±5 % of schedstat.
fn runqueue(b: &mut Bench, bin: &Path, seconds: u64) -> anyhow::Result<()> {
    let groups = b.cgroups("runq", 100, 2000)?;
    for g in &groups {
        let mut cmd = Command::new(bin);
        cmd.args(["burn", "--threads", "1", "--percent", "3"]);
        b.run_in(g, cmd)?;
    }
    let dirs: Vec<PathBuf> = groups.iter().map(|g| g.cpu.clone()).collect();
    std::thread::sleep(Duration::from_secs(1));
    let mut ebpf_cmd = sense_cmd(bin, "ebpf", &dirs, seconds);
    ebpf_cmd.arg("--floor");
    let mut poll_cmd = sense_cmd(bin, "poll", &dirs, seconds);
    poll_cmd.args(["--read-every", "1s"]);
    let ebpf = ebpf_cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("run mbcas sense (eBPF)")?;
    let poll = poll_cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("run mbcas sense (poll)")?;
    let (e, p) = (ebpf.wait_with_output()?, poll.wait_with_output()?);
    b.stop_burners();
    if !e.status.success() || !p.status.success() {
        bail!("mbcas sense failed: eBPF {}, poll {}", e.status, p.status);
    }
    let e: Value = serde_json::from_slice(&e.stdout).context("sense output is not JSON")?;
    let p: Value = serde_json::from_slice(&p.stdout).context("sense output is not JSON")?;
    report(
        &format!("100 busy cgroups (30 m wanted each, no quota), {seconds} s: run-queue wait"),
        &e,
        seconds,
    );
    let waits = |v: &Value| -> std::collections::HashMap<String, f64> {
        v["cgroups"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| Some((c["path"].as_str()?.to_owned(), c["wait_ns"].as_f64()?)))
            .collect()
    };
    let (we, wp) = (waits(&e), waits(&p));
    let mut errors: Vec<f64> = we
        .iter()
        .filter_map(|(k, &x)| {
            let y = *wp.get(k)?;
            (y > 0.0).then(|| (x - y) / y * 100.0)
        })
        .collect();
    errors.sort_by(|a, b| a.abs().total_cmp(&b.abs()));
    let q = |f: f64| {
        errors
            .get(((errors.len().max(1) - 1) as f64 * f).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    let (se, sp): (f64, f64) = (we.values().sum(), wp.values().sum());
    println!(
        "  wait: eBPF Σ {:.2} s, schedstat Σ {:.2} s ({:+.2} %); per cgroup |error| p50 {:.2} %, p99 {:.2} %, max {:.2} % ({} cgroups; goal ±5 %)",
        se / 1e9,
        sp / 1e9,
        (se - sp) / sp.max(1.0) * 100.0,
        q(0.5).abs(),
        q(0.99).abs(),
        errors.last().copied().unwrap_or(f64::NAN).abs(),
        errors.len()
    );
    let cpu =
        |v: &Value| v["window"]["cpu_s"].as_f64().unwrap_or(f64::NAN) / seconds as f64 * 100.0;
    let kernel_s: f64 = e["programs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["name"].as_str().is_some_and(|n| !n.contains("floor")))
        .map(|p| p["run_time_ns"].as_f64().unwrap_or(0.0) / 1e9)
        .sum();
    println!(
        "  whole sensor CPU: eBPF {:.3} % (kernel programs {:.3} % + user {:.3} %); schedstat poller every 1 s {:.3} % (user only)",
        cpu(&e) + kernel_s / seconds as f64 * 100.0,
        kernel_s / seconds as f64 * 100.0,
        cpu(&e),
        cpu(&p)
    );
    Ok(())
}

/// One contender of the comparison: how `mbcas sense` runs.
struct Contender {
    name: &'static str,
    sensor: &'static str,
    read_every: &'static str,
}

const CONTENDERS: [Contender; 3] = [
    Contender {
        name: "MBCAS (eBPF, counters read every 1 s)",
        sensor: "ebpf",
        read_every: "1s",
    },
    Contender {
        name: "cpu.stat polled every 1 s (koordlet)",
        sensor: "poll",
        read_every: "1s",
    },
    Contender {
        name: "cpu.stat polled every 100 ms (Autothrottle)",
        sensor: "poll",
        read_every: "100ms",
    },
];

fn compare(b: &mut Bench, bin: &Path, opts: &Options) -> anyhow::Result<()> {
    let groups = b.cgroups("cmp", opts.cgroups, 10)?;
    let dirs: Vec<PathBuf> = groups.iter().map(|g| g.cpu.clone()).collect();
    println!(
        "bench-sensor --compare: {} cgroups at 10 m, one spinning process each started after the sensor, {} s per contender",
        groups.len(),
        opts.seconds
    );
    println!(
        "{:<46} {:>9} {:>9} {:>9} {:>11} {:>11} {:>7} {:>9}",
        "contender", "CPU %", "kernel %", "user %", "detect p50", "detect p99", "missed", "RSS MiB"
    );
    for c in &CONTENDERS {
        let mut cmd = sense_cmd(bin, c.sensor, &dirs, opts.seconds);
        cmd.args(["--read-every", c.read_every]);
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("run mbcas sense")?;
        let stderr = child.stderr.take().context("sense stderr")?;
        let (ready_tx, ready_rx) = mpsc::channel();
        let echo = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.starts_with("mbcas sense: watching") {
                    let _ = ready_tx.send(());
                } else {
                    eprintln!("{line}");
                }
            }
        });
        if ready_rx.recv_timeout(Duration::from_secs(60)).is_err() {
            let _ = child.kill();
            let _ = child.wait();
            bail!("mbcas sense ({}) did not start", c.name);
        }
        let mut started = std::collections::HashMap::new();
        for g in &groups {
            started.insert(g.cpu.clone(), b.burn_in(g)?);
        }
        let out = child.wait_with_output().context("wait for mbcas sense")?;
        let _ = echo.join();
        b.stop_burners();
        if !out.status.success() {
            bail!("mbcas sense ({}) failed: {}", c.name, out.status);
        }
        let v: Value = serde_json::from_slice(&out.stdout).context("sense output is not JSON")?;
        let mut latency_ms = Vec::new();
        let mut missed = 0;
        for cg in v["cgroups"].as_array().into_iter().flatten() {
            let path = PathBuf::from(cg["path"].as_str().unwrap_or_default());
            match (cg["onset_ns"].as_u64(), started.get(&path)) {
                (Some(onset), Some(&t0)) => latency_ms.push(onset.saturating_sub(t0) as f64 / 1e6),
                _ => missed += 1,
            }
        }
        latency_ms.sort_by(f64::total_cmp);
        let q = |p: f64| {
            latency_ms
                .get(((latency_ms.len().max(1) - 1) as f64 * p).round() as usize)
                .copied()
                .unwrap_or(f64::NAN)
        };
        let kernel_s: f64 = v["programs"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| p["run_time_ns"].as_f64().unwrap_or(0.0) / 1e9)
            .fold(0.0, |a, b| a + b);
        let user_s = v["window"]["cpu_s"].as_f64().unwrap_or(f64::NAN);
        let secs = opts.seconds as f64;
        println!(
            "{:<46} {:>9.3} {:>9.3} {:>9.3} {:>8.1} ms {:>8.1} ms {:>7} {:>9.1}",
            c.name,
            100.0 * (kernel_s + user_s) / secs,
            100.0 * kernel_s / secs,
            100.0 * user_s / secs,
            q(0.5),
            q(0.99),
            missed,
            v["window"]["rss_kib"].as_f64().unwrap_or(f64::NAN) / 1024.0
        );
        // Let the groups go idle before the next contender.
        std::thread::sleep(Duration::from_secs(1));
    }
    println!(
        "  CPU: share of one core in the window (kernel programs by bpf_stats, the sensing process by getrusage); \
         detect: burner's start in its cgroup → the process knows the cgroup is throttled; goal: MBCAS's p99 ≤ the \
         100 ms poller's, and its CPU ≤ the 1 s poller's"
    );
    Ok(())
}
