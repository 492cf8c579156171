//! `mbcas sense`: watch cgroups for a while and print what the sensor saw.
//!
//! For each cgroup: path, id (inode), periods, throttled periods, throttled time,
//! throttle events received and CPU usage over the window, and which sensor
//! produced them. Cgroups that do not exist, are not CPU cgroups, or vanish
//! mid-window are reported as skipped with the reason; the others are measured.
//!
//! `--read-every` reads the counters on a cadence, as the daemon's tick or a
//! `cpu.stat` poller does, and notes when each cgroup was first known throttled
//! (from an onset event with eBPF, or from a rise of its throttled periods):
//! `cargo xtask bench-sensor --compare` sets MBCAS against pollers with it.

use std::{collections::HashMap, path::PathBuf, time::Duration};

use serde::Serialize;

use crate::{
    cgroup::CgroupDir,
    error::error_chain,
    sensor::{
        Sensor, SensorError, SensorKind, SensorMode,
        ebpf::{KernelStats, ProgramCost},
    },
    units::CgroupId,
};

#[derive(Debug, clap::Args)]
pub struct SenseArgs {
    /// A cgroup directory to watch (repeatable): on v1 the `cpu` hierarchy's
    /// directory, e.g. /sys/fs/cgroup/cpu/mygroup; on v2 /sys/fs/cgroup/mygroup.
    #[arg(long = "cgroup", value_name = "DIR", required = true)]
    pub cgroups: Vec<PathBuf>,
    /// Length of the window (`20`, `20s`, `500ms`; a bare number is seconds;
    /// at most a day).
    #[arg(long, value_name = "DURATION", value_parser = parse_window)]
    pub duration: Duration,
    /// Which sensor to use.
    #[arg(long, value_enum, default_value_t)]
    pub sensor: SensorMode,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Read every cgroup's counters at this interval (`1s`, `100ms`) during the
    /// window and report when each was first known throttled: from the
    /// counters, and with eBPF also from the onset event, whichever is first.
    #[arg(long, value_name = "DURATION", value_parser = parse_interval)]
    pub read_every: Option<Duration>,
    /// Also attach an empty program to the hrtimer hook (eBPF): its cost per
    /// call is the hook's own, which no program on it can go below.
    #[arg(long)]
    pub floor: bool,
}

fn parse_interval(s: &str) -> Result<Duration, String> {
    let d = crate::config::parse_duration(s)?;
    if d < Duration::from_millis(1) || d > Duration::from_secs(3600) {
        return Err(format!("{s}: must be between 1ms and 1h"));
    }
    Ok(d)
}

fn parse_window(s: &str) -> Result<Duration, String> {
    let d = crate::config::parse_duration(s)?;
    if d.is_zero() || d > Duration::from_secs(86_400) {
        return Err(format!("{s}: must be > 0 and at most a day"));
    }
    Ok(d)
}

#[derive(Debug, Serialize)]
pub struct SenseReport {
    pub sensor: SensorKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fallback_reason: Option<String>,
    pub window_s: f64,
    pub cgroups: Vec<CgroupReport>,
    pub skipped: Vec<Skipped>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel: Option<KernelStats>,
    /// Per-program run counts and time (eBPF; run time needs `kernel.bpf_stats_enabled=1`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub programs: Vec<ProgramCost>,
    /// Delay from the kernel making an event to this process receiving it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_latency_us: Option<Latency>,
    /// This process's own cost over its life.
    pub resources: Resources,
    /// Its cost during the window only (start-up excluded), and its RSS at the end.
    pub window: WindowCost,
}

#[derive(Debug, Default, Serialize)]
pub struct WindowCost {
    /// User + system CPU time spent in the window, in seconds.
    pub cpu_s: f64,
    /// Resident set size at the end of the window, in KiB.
    pub rss_kib: u64,
}

/// `VmRSS` of this process in KiB (0 when unreadable).
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

#[derive(Debug, Default, Serialize)]
pub struct Latency {
    pub n: usize,
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

impl Latency {
    fn of(mut v: Vec<u64>) -> Option<Self> {
        if v.is_empty() {
            return None;
        }
        v.sort_unstable();
        let q = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize] as f64 / 1000.0;
        Some(Self {
            n: v.len(),
            p50: q(0.5),
            p99: q(0.99),
            max: q(1.0),
        })
    }
}

#[derive(Debug, Default, Serialize)]
pub struct Resources {
    /// User + system CPU time, in seconds.
    pub cpu_s: f64,
    /// Peak resident set size, in KiB.
    pub max_rss_kib: u64,
}

impl Resources {
    pub fn of_self() -> Self {
        use nix::sys::{resource, time::TimeValLike as _};
        match resource::getrusage(resource::UsageWho::RUSAGE_SELF) {
            Ok(u) => Self {
                cpu_s: (u.user_time().num_microseconds() + u.system_time().num_microseconds())
                    as f64
                    / 1e6,
                max_rss_kib: u64::try_from(u.max_rss()).unwrap_or(0),
            },
            Err(_) => Self::default(),
        }
    }
}

/// CLOCK_MONOTONIC in ns: the clock `bpf_ktime_get_ns` reads.
fn monotonic_ns() -> Option<u64> {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).ok()?;
    u64::try_from(t.tv_sec())
        .ok()?
        .checked_mul(1_000_000_000)?
        .checked_add(u64::try_from(t.tv_nsec()).ok()?)
}

#[derive(Debug, Serialize)]
pub struct CgroupReport {
    pub path: PathBuf,
    pub id: CgroupId,
    pub nr_periods: u64,
    pub nr_throttled: u64,
    pub throttled_ns: u64,
    pub events: u64,
    pub usage_ns: Option<u64>,
    /// Run-queue wait of the cgroup's threads and its descendants' over the
    /// window (ns of thread-time); `None` when the sensor cannot tell.
    pub wait_ns: Option<u64>,
    /// CLOCK_MONOTONIC (ns) when the cgroup was first known throttled in the
    /// window, and how (`event`, `read`); with `--read-every` only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub onset_ns: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub onset_by: Option<&'static str>,
}

#[derive(Debug, Serialize)]
pub struct Skipped {
    pub path: PathBuf,
    pub error: String,
}

/// When each watched cgroup was first known throttled, and how.
type Onsets = HashMap<u64, (u64, &'static str)>;

/// Runs the window. Needs a tokio runtime.
pub async fn sense(args: &SenseArgs, debug_log: bool) -> Result<SenseReport, SensorError> {
    let mut sensor = Sensor::start(args.sensor, debug_log)?;
    if args.floor {
        sensor.attach_floor()?;
    }
    let mut skipped = Vec::new();
    let mut watched = Vec::new();
    for path in &args.cgroups {
        match CgroupDir::open(path)
            .map_err(SensorError::from)
            .and_then(|d| Ok((sensor.read(&d)?, d)))
        {
            Ok((before, dir)) => watched.push((dir, before)),
            Err(e) => skipped.push(Skipped {
                path: path.clone(),
                error: error_chain(&e),
            }),
        }
    }
    let onsets = std::sync::Arc::new(std::sync::Mutex::new(Onsets::new()));
    let ids: Vec<u64> = watched.iter().map(|(d, _)| d.id.0).collect();
    let track_onsets = args.read_every.is_some();
    let counter = sensor.take_events().map(|mut rx| {
        let onsets = std::sync::Arc::clone(&onsets);
        tokio::spawn(async move {
            let mut counts: HashMap<u64, u64> = HashMap::new();
            let mut latencies = Vec::new();
            while let Some(ev) = rx.recv().await {
                let now = monotonic_ns();
                if let Some(now) = now {
                    latencies.push(now.saturating_sub(ev.ts_ns));
                }
                if ids.contains(&ev.cgroup_id) {
                    *counts.entry(ev.cgroup_id).or_default() += 1;
                    if track_onsets
                        && ev.kind == mbcas_common::EVENT_PERIOD_THROTTLED
                        && let (Some(now), Ok(mut o)) = (now, onsets.lock())
                    {
                        o.entry(ev.cgroup_id).or_insert((now, "event"));
                    }
                }
            }
            (counts, latencies)
        })
    });
    let cpu_at_start = Resources::of_self().cpu_s;
    eprintln!(
        "mbcas sense: watching {} cgroups for {:?} ({} sensor)",
        watched.len(),
        args.duration,
        sensor.kind().as_str()
    );
    match args.read_every {
        None => tokio::time::sleep(args.duration).await,
        Some(every) => {
            let end = tokio::time::Instant::now() + args.duration;
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            while tokio::time::timeout_at(end, tick.tick()).await.is_ok() {
                for (dir, before) in &watched {
                    // A cgroup that vanished is reported at the end.
                    let Ok(now) = sensor.read(dir) else { continue };
                    if now.nr_throttled > before.nr_throttled
                        && let (Some(t), Ok(mut o)) = (monotonic_ns(), onsets.lock())
                    {
                        o.entry(dir.id.0).or_insert((t, "read"));
                    }
                }
            }
        }
    }
    let window_cpu_s = Resources::of_self().cpu_s - cpu_at_start;
    let mut cgroups = Vec::new();
    let mut finals = Vec::new();
    for (dir, before) in watched {
        match sensor.read(&dir) {
            Ok(after) => finals.push((dir, before, after)),
            Err(e) => skipped.push(Skipped {
                path: dir.path.clone(),
                error: format!("vanished mid-window: {}", error_chain(&e)),
            }),
        }
    }
    let window = WindowCost {
        cpu_s: window_cpu_s,
        rss_kib: rss_kib(),
    };
    let kernel = sensor.kernel_stats();
    let programs = sensor.program_costs();
    let kind = sensor.kind();
    let fallback_reason = sensor.fallback_reason().map(str::to_owned);
    // Dropping the sensor detaches the programs and closes the event stream.
    drop(sensor);
    let (counts, latencies) = match counter {
        Some(h) => h.await.unwrap_or_default(),
        None => (HashMap::new(), Vec::new()),
    };
    let onsets = onsets.lock().map(|o| o.clone()).unwrap_or_default();
    for (dir, before, after) in finals {
        let onset = onsets.get(&dir.id.0);
        cgroups.push(CgroupReport {
            id: dir.id,
            nr_periods: after.nr_periods.saturating_sub(before.nr_periods),
            nr_throttled: after.nr_throttled.saturating_sub(before.nr_throttled),
            throttled_ns: after.throttled_ns.saturating_sub(before.throttled_ns),
            events: counts.get(&dir.id.0).copied().unwrap_or(0),
            usage_ns: after
                .usage_ns
                .zip(before.usage_ns)
                .map(|(a, b)| a.saturating_sub(b)),
            wait_ns: after
                .wait_ns
                .zip(before.wait_ns)
                .map(|(a, b)| a.saturating_sub(b)),
            onset_ns: onset.map(|o| o.0),
            onset_by: onset.map(|o| o.1),
            path: dir.path,
        });
    }
    Ok(SenseReport {
        sensor: kind,
        fallback_reason,
        window_s: args.duration.as_secs_f64(),
        cgroups,
        skipped,
        kernel,
        programs,
        event_latency_us: Latency::of(latencies),
        resources: Resources::of_self(),
        window,
    })
}

/// The human-readable table.
pub fn render_table(r: &SenseReport) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "sensor: {} (window {:.1} s)",
        r.sensor.as_str(),
        r.window_s
    );
    if let Some(why) = &r.fallback_reason {
        let _ = writeln!(s, "note: eBPF unavailable, polled cpu.stat instead: {why}");
    }
    let _ = writeln!(
        s,
        "{:<48} {:>12} {:>9} {:>10} {:>15} {:>7} {:>15} {:>15}",
        "cgroup", "id", "periods", "throttled", "throttled_ns", "events", "usage_ns", "wait_ns"
    );
    for c in &r.cgroups {
        let usage = c.usage_ns.map_or_else(|| "-".to_owned(), |u| u.to_string());
        let wait = c.wait_ns.map_or_else(|| "-".to_owned(), |u| u.to_string());
        let _ = writeln!(
            s,
            "{:<48} {:>12} {:>9} {:>10} {:>15} {:>7} {:>15} {:>15}",
            c.path.display(),
            c.id,
            c.nr_periods,
            c.nr_throttled,
            c.throttled_ns,
            c.events,
            usage,
            wait
        );
    }
    for k in &r.skipped {
        let _ = writeln!(s, "skipped {}: {}", k.path.display(), k.error);
    }
    for p in &r.programs {
        let per_call = if p.run_count > 0 {
            p.run_time_ns as f64 / p.run_count as f64
        } else {
            0.0
        };
        let _ = writeln!(
            s,
            "program {}: {} calls, {:.0} ns/call",
            p.name, p.run_count, per_call
        );
    }
    if let Some(l) = &r.event_latency_us {
        let _ = writeln!(
            s,
            "event latency: p50 {:.0} µs, p99 {:.0} µs, max {:.0} µs over {} events",
            l.p50, l.p99, l.max, l.n
        );
    }
    let _ = writeln!(
        s,
        "mbcas sense in the window: {:.3} s CPU ({:.2} % of one core), RSS {:.1} MiB (peak {:.1} MiB)",
        r.window.cpu_s,
        100.0 * r.window.cpu_s / r.window_s,
        r.window.rss_kib as f64 / 1024.0,
        r.resources.max_rss_kib as f64 / 1024.0
    );
    if let Some(k) = &r.kernel {
        let _ = writeln!(
            s,
            "kernel: {} events, {} ring-buffer drops, {} user drops, {} read errors, {} period timers",
            k.events, k.ringbuf_drops, k.user_drops, k.read_errors, k.period_timers
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use crate::cli::{Cli, Command};

    #[test]
    fn flags_parse() {
        let cli = Cli::try_parse_from([
            "mbcas",
            "sense",
            "--cgroup",
            "/a",
            "--cgroup",
            "/b",
            "--duration",
            "2.5",
            "--sensor",
            "poll",
            "--json",
            "--read-every",
            "100ms",
        ])
        .unwrap();
        let Command::Sense(a) = cli.command else {
            panic!("not sense")
        };
        assert_eq!(a.cgroups.len(), 2);
        assert_eq!(a.duration.as_millis(), 2500);
        assert!(a.json);
        assert_eq!(a.read_every, Some(std::time::Duration::from_millis(100)));
        assert!(!a.floor);
        assert!(
            Cli::try_parse_from(["mbcas", "sense", "--cgroup", "/a", "--duration", "0"]).is_err()
        );
        assert!(Cli::try_parse_from(["mbcas", "sense", "--duration", "1"]).is_err());
    }
}
