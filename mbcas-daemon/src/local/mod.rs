//! Local mode: the MBCAS loop over plain cgroups, no Kubernetes.
//!
//! Every child directory of `--local-root` is a consumer: its weight is its
//! `cpu.shares` (v1) or `cpu.weight` (v2), its floor the `--min-limit`, its cap the
//! machine's capacity. Each round reads the consumers' counters through the
//! sensor (eBPF or cpu.stat polling), runs the [`Engine`] (demand → market →
//! policy) and writes the changed quotas directly. Throttle events wake the loop
//! (after `--debounce`); otherwise it runs every `--tick`.
//!
//! Nothing stops the loop but a signal: a consumer that vanishes is dropped, a
//! file that cannot be read or holds garbage skips that consumer for the round,
//! and a quota changed behind MBCAS's back is taken as the new current limit —
//! each is logged and counted in [`LoopStats`]. On SIGINT/SIGTERM the quotas are
//! left as `--on-exit` says (default: restore those found at start).

use std::{
    collections::BTreeMap,
    io::Write as _,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::{
    cgroup::{
        CgroupDir, CgroupFsError, Hierarchy,
        files::{self, Quota},
    },
    config::DecisionConfig,
    demand::Counters,
    engine::{ConsumerInput, Engine, EngineConfig, EngineError, NodeInput, StepOutcome},
    policy::Reason,
    sensor::{Sensor, SensorError, SensorMode},
    units::{MilliCpu, PodKey},
};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum OnExit {
    /// Leave the quotas MBCAS wrote.
    Keep,
    /// Put back the quotas found at start.
    #[default]
    Restore,
}

#[derive(Debug, Clone, clap::Args)]
pub struct LocalArgs {
    /// Local mode: the directory whose child cgroups are the consumers (on cgroup
    /// v1 a directory of the `cpu` hierarchy, e.g. /sys/fs/cgroup/cpu/apps).
    #[arg(
        long,
        env = "MBCAS_LOCAL_ROOT",
        value_name = "DIR",
        help_heading = "Local mode"
    )]
    pub local_root: Option<PathBuf>,
    /// Local mode: CPU the consumers share, in millicores (default: all online CPUs).
    #[arg(
        long,
        env = "MBCAS_CAPACITY_MILLICORES",
        value_name = "N",
        help_heading = "Local mode"
    )]
    pub capacity_millicores: Option<u64>,
    /// Local mode: what to do with the quotas on SIGINT/SIGTERM.
    #[arg(
        long,
        value_enum,
        env = "MBCAS_ON_EXIT",
        default_value_t,
        help_heading = "Local mode"
    )]
    pub on_exit: OnExit,
    /// Which sensor feeds the loop.
    #[arg(long, value_enum, env = "MBCAS_SENSOR", default_value_t)]
    pub sensor: SensorMode,
    /// Local mode: append one JSON line per round (consumers, demand, limits,
    /// reasons) to FILE, or `-` for standard output.
    #[arg(long, value_name = "FILE", help_heading = "Local mode")]
    pub report_jsonl: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("--local-root is required with --mode local")]
    NoRoot,
    #[error("--local-root {path}: not a directory")]
    BadRoot { path: PathBuf },
    #[error("--capacity-millicores must be > 0")]
    ZeroCapacity,
    #[error(transparent)]
    Sensor(#[from] SensorError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("cannot write the round report to {path}")]
    Report {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What went wrong while the loop kept running.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct LoopStats {
    pub rounds: u64,
    pub quota_writes: u64,
    pub consumers_added: u64,
    pub consumers_removed: u64,
    pub external_changes: u64,
    /// Read/write errors by kind (`unreadable`, `malformed`, …).
    pub errors: BTreeMap<&'static str, u64>,
    pub events: u64,
}

struct Consumer {
    name: String,
    dir: CgroupDir,
    original: Quota,
    /// What MBCAS last wrote, to notice changes made by others.
    written: Option<MilliCpu>,
}

/// One consumer in a round report.
#[derive(Debug, Serialize)]
pub struct ConsumerReport<'a> {
    pub name: &'a str,
    pub weight: f64,
    pub usage_m: Option<f64>,
    pub demand_m: Option<f64>,
    pub need_m: u64,
    pub allocation_m: u64,
    pub limit_m: u64,
    pub throttled_ratio: f64,
    pub reason: &'static str,
    pub changed: bool,
}

#[derive(Debug, Serialize)]
pub struct RoundReport<'a> {
    pub t: f64,
    pub capacity_m: u64,
    pub price: f64,
    pub overcommitted: bool,
    pub consumers: Vec<ConsumerReport<'a>>,
}

pub struct LocalLoop {
    root: PathBuf,
    capacity: MilliCpu,
    cfg: DecisionConfig,
    on_exit: OnExit,
    sensor: Sensor,
    engine: Engine,
    consumers: BTreeMap<String, Consumer>,
    stats: LoopStats,
    report: Option<Box<dyn std::io::Write + Send>>,
    report_path: PathBuf,
    start: Instant,
    /// Consumers throttled in the last round (their events do not wake the loop).
    throttled: std::collections::HashSet<u64>,
    /// Where the per-consumer and market series go (`/metrics`), when served.
    metrics: Option<crate::metrics::Metrics>,
}

fn default_capacity() -> MilliCpu {
    MilliCpu(std::thread::available_parallelism().map_or(1, |n| n.get() as u64) * 1000)
}

impl LocalLoop {
    /// Validates the arguments and starts the sensor (needs a tokio runtime).
    pub fn new(args: &LocalArgs, cfg: DecisionConfig, debug_log: bool) -> Result<Self, LocalError> {
        let root = args.local_root.clone().ok_or(LocalError::NoRoot)?;
        if !root.is_dir() {
            return Err(LocalError::BadRoot { path: root });
        }
        let capacity = match args.capacity_millicores {
            Some(0) => return Err(LocalError::ZeroCapacity),
            Some(n) => MilliCpu(n),
            None => default_capacity(),
        };
        let sensor = Sensor::start(args.sensor, debug_log)?;
        let (report, report_path): (Option<Box<dyn std::io::Write + Send>>, PathBuf) =
            match &args.report_jsonl {
                None => (None, PathBuf::new()),
                Some(p) if p.as_os_str() == "-" => (Some(Box::new(std::io::stdout())), p.clone()),
                Some(p) => {
                    let f = std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(p)
                        .map_err(|source| LocalError::Report {
                            path: p.clone(),
                            source,
                        })?;
                    (Some(Box::new(f)), p.clone())
                }
            };
        let engine = Engine::new(EngineConfig {
            demand: cfg.demand,
            policy: cfg.policy,
            overcommit: cfg.market.overcommit,
            reserve: cfg.market.node_reserve,
        });
        tracing::info!(root = %root.display(), capacity = %capacity, sensor = sensor.kind().as_str(), "local mode");
        Ok(Self {
            root,
            capacity,
            cfg,
            on_exit: args.on_exit,
            sensor,
            engine,
            consumers: BTreeMap::new(),
            stats: LoopStats::default(),
            report,
            report_path,
            start: Instant::now(),
            throttled: std::collections::HashSet::new(),
            metrics: None,
        })
    }

    /// Publishes each round's figures to `metrics` (served on `/metrics`).
    pub fn with_metrics(mut self, metrics: crate::metrics::Metrics) -> Self {
        metrics.set_sensor_mode(self.sensor.kind().as_str());
        self.metrics = Some(metrics);
        self
    }

    fn export(&self, outcome: &StepOutcome) {
        let Some(m) = &self.metrics else { return };
        m.set_market(outcome.price, outcome.capacity, outcome.overcommitted);
        let mut live = Vec::with_capacity(outcome.rows.len());
        for row in &outcome.rows {
            let labels = crate::metrics::PodLabels::new("", row.key.to_string());
            if let Some(e) = row.estimate {
                m.set_pod_demand(&labels, e.smoothed, row.need);
                m.set_pod_throttled_ratio(&labels, e.throttled_ratio);
            }
            m.set_pod_allocation(&labels, row.to);
            m.inc_decision(row.reason.as_str());
            live.push(labels);
        }
        m.retain_pods(live.iter());
        if let Some(stats) = self.sensor.kernel_stats() {
            m.observe_kernel_stats(&stats);
        }
        m.observe_program_costs(&self.sensor.program_costs());
    }

    pub fn stats(&self) -> &LoopStats {
        &self.stats
    }

    fn count_error(&mut self, e: &CgroupFsError) {
        *self.stats.errors.entry(e.kind()).or_default() += 1;
    }

    /// Finds new consumers and drops vanished ones.
    fn discover(&mut self) {
        let mut seen = Vec::new();
        match std::fs::read_dir(&self.root) {
            Ok(entries) => {
                for e in entries.flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir())
                        && let Some(name) = e.file_name().to_str()
                    {
                        seen.push((name.to_owned(), e.path()));
                    }
                }
            }
            Err(e) => {
                tracing::warn!(root = %self.root.display(), error = %e, "cannot list consumers")
            }
        }
        let names: Vec<&str> = seen.iter().map(|(n, _)| n.as_str()).collect();
        let gone: Vec<String> = self
            .consumers
            .keys()
            .filter(|k| !names.contains(&k.as_str()))
            .cloned()
            .collect();
        for name in gone {
            tracing::warn!(consumer = %name, "consumer cgroup removed; forgetting it");
            self.consumers.remove(&name);
            self.stats.consumers_removed += 1;
        }
        for (name, path) in seen {
            if self.consumers.contains_key(&name) {
                continue;
            }
            match CgroupDir::open(&path)
                .and_then(|dir| Ok((files::read_quota(&dir.path, dir.hierarchy)?, dir)))
            {
                Ok((original, dir)) => {
                    tracing::info!(consumer = %name, id = %dir.id, quota = ?original.millicores(), "new consumer");
                    self.consumers.insert(
                        name.clone(),
                        Consumer {
                            name,
                            dir,
                            original,
                            written: None,
                        },
                    );
                    self.stats.consumers_added += 1;
                }
                Err(e) => {
                    tracing::warn!(consumer = %name, error = %crate::error::error_chain(&e), "cannot use consumer");
                    self.count_error(&e);
                }
            }
        }
    }

    /// One round: read, decide, write. Returns the engine's outcome.
    pub fn round(&mut self) -> Result<StepOutcome, LocalError> {
        let _timer = self
            .metrics
            .as_ref()
            .map(crate::metrics::Metrics::loop_timer);
        self.discover();
        let now = self.start.elapsed();
        let at_ns = u64::try_from(now.as_nanos()).unwrap_or(u64::MAX);
        let mut inputs = Vec::new();
        let mut weights = Vec::new();
        let mut vanished = Vec::new();
        let mut failures = Vec::new();
        for c in self.consumers.values_mut() {
            let read = (|| -> Result<_, SensorError> {
                let counters = self.sensor.read(&c.dir)?;
                let quota = files::read_quota(&c.dir.path, c.dir.hierarchy)?;
                let weight = files::read_weight(&c.dir.path, c.dir.hierarchy)?;
                let psi = if c.dir.hierarchy == Hierarchy::V2 {
                    files::read_pressure_some_ns(&c.dir.path)?
                } else {
                    None
                };
                Ok((counters, quota, weight, psi))
            })();
            let (counters, quota, weight, psi) = match read {
                Ok(v) => v,
                Err(SensorError::Cgroup(CgroupFsError::Vanished { .. })) => {
                    vanished.push(c.name.clone());
                    continue;
                }
                Err(e) => {
                    tracing::warn!(consumer = %c.name, error = %crate::error::error_chain(&e), "skipping consumer this round");
                    failures.push(e.kind());
                    continue;
                }
            };
            let current = quota.millicores().unwrap_or(self.capacity);
            if let Some(w) = c.written
                && w != current
            {
                tracing::warn!(consumer = %c.name, wrote = %w, found = %current, "quota changed behind MBCAS's back; taking it as the current limit");
                self.stats.external_changes += 1;
                c.written = None;
            }
            let Some(usage_ns) = counters.usage_ns else {
                tracing::warn!(consumer = %c.name, "no CPU usage counter for this cgroup; skipping");
                failures.push("no_usage");
                continue;
            };
            inputs.push(ConsumerInput {
                key: PodKey::from(c.name.as_str()),
                counters: Counters {
                    at_ns,
                    usage_ns,
                    throttled_ns: counters.throttled_ns,
                    nr_periods: counters.nr_periods,
                    nr_throttled: counters.nr_throttled,
                    psi_some_ns: psi,
                },
                current,
                original: c.original.millicores().unwrap_or(self.capacity),
                weight,
                floor: self.cfg.market.min_limit,
                cap: self.cfg.market.cap(
                    c.original.millicores().unwrap_or(self.capacity),
                    self.cfg.market.min_limit,
                    self.capacity,
                ),
                exclusion: None,
                // Local mode writes the quota itself, at once.
                window_limit: None,
            });
            weights.push(weight);
        }
        for kind in failures {
            *self.stats.errors.entry(kind).or_default() += 1;
        }
        for name in vanished {
            tracing::warn!(consumer = %name, "consumer cgroup vanished; forgetting it");
            self.consumers.remove(&name);
            self.stats.consumers_removed += 1;
        }
        let outcome = self
            .engine
            .step(now, &NodeInput::new(self.capacity), &inputs)?;
        let threshold = self.cfg.policy.throttled_threshold;
        self.throttled = outcome
            .rows
            .iter()
            .filter(|r| r.estimate.is_some_and(|e| e.throttled_ratio > threshold))
            .filter_map(|r| self.consumers.get(r.key.as_str()).map(|c| c.dir.id.0))
            .collect();
        for row in outcome.rows.iter().filter(|r| r.changed()) {
            let Some(c) = self.consumers.get_mut(row.key.as_str()) else {
                continue;
            };
            let q = Quota::from_millicores(row.to, c.original.period_us.max(1000));
            match files::write_quota(&c.dir.path, c.dir.hierarchy, q) {
                Ok(()) => {
                    c.written = Some(row.to);
                    self.stats.quota_writes += 1;
                    tracing::info!(consumer = %row.key, from = %row.from, to = %row.to, need = %row.need, reason = row.reason.as_str(), "quota changed");
                }
                Err(e) => {
                    tracing::warn!(consumer = %row.key, error = %crate::error::error_chain(&e), "cannot write quota");
                    *self.stats.errors.entry(e.kind()).or_default() += 1;
                }
            }
        }
        self.stats.rounds += 1;
        self.export(&outcome);
        self.write_report(now, &outcome, &weights)?;
        Ok(outcome)
    }

    fn write_report(
        &mut self,
        now: Duration,
        o: &StepOutcome,
        weights: &[f64],
    ) -> Result<(), LocalError> {
        let Some(out) = self.report.as_mut() else {
            return Ok(());
        };
        let consumers = o
            .rows
            .iter()
            .zip(weights)
            .map(|(r, &weight)| ConsumerReport {
                name: r.key.as_str(),
                weight,
                usage_m: r.estimate.map(|e| e.usage),
                demand_m: r.estimate.map(|e| e.smoothed),
                need_m: r.need.0,
                allocation_m: r.allocation.0,
                limit_m: r.to.0,
                throttled_ratio: r.estimate.map_or(0.0, |e| e.throttled_ratio),
                reason: if r.changed() || r.reason != Reason::Unchanged {
                    r.reason.as_str()
                } else {
                    "unchanged"
                },
                changed: r.changed(),
            })
            .collect();
        let line = RoundReport {
            t: now.as_secs_f64(),
            capacity_m: o.capacity.0,
            price: o.price,
            overcommitted: o.overcommitted,
            consumers,
        };
        let path = self.report_path.clone();
        let text = serde_json::to_string(&line).map_err(|e| LocalError::Report {
            path: path.clone(),
            source: e.into(),
        })?;
        writeln!(out, "{text}")
            .and_then(|()| out.flush())
            .map_err(|source| LocalError::Report { path, source })
    }

    /// Runs rounds until `shutdown`, then applies `--on-exit`.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<LoopStats, LocalError> {
        let mut events = self.sensor.take_events();
        let tick = self.cfg.tick;
        let debounce = self.cfg.debounce;
        let mut next = Instant::now();
        loop {
            self.round()?;
            next += tick;
            if next < Instant::now() {
                next = Instant::now() + tick;
            }
            let woke = tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep_until(next) => false,
                ev = self.next_onset(&mut events) => ev,
            };
            if woke {
                self.stats.events += 1;
                // Debounce: let a burst of events settle, then decide once.
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(debounce) => {}
                }
                if let Some(rx) = events.as_mut() {
                    while rx.try_recv().is_ok() {
                        self.stats.events += 1;
                    }
                }
            }
        }
        self.finish();
        Ok(self.stats)
    }

    fn finish(&mut self) {
        if self.on_exit == OnExit::Keep {
            tracing::info!("leaving the quotas as they are (--on-exit keep)");
            return;
        }
        for c in self.consumers.values() {
            match files::write_quota(&c.dir.path, c.dir.hierarchy, c.original) {
                Ok(()) => {
                    tracing::info!(consumer = %c.name, quota = ?c.original.millicores(), "quota restored")
                }
                Err(e) => {
                    tracing::warn!(consumer = %c.name, error = %crate::error::error_chain(&e), "cannot restore quota")
                }
            }
        }
    }

    /// Waits for a throttle event that marks the *onset* of throttling for a
    /// consumer (one not throttled in the last round); events of consumers already
    /// known to be throttled are counted and left to the tick.
    async fn next_onset(
        &self,
        events: &mut Option<tokio::sync::mpsc::Receiver<crate::sensor::ThrottleEvent>>,
    ) -> bool {
        loop {
            let Some(ev) = recv(events).await else {
                return false;
            };
            if ev.kind == mbcas_common::EVENT_PERIOD_THROTTLED
                && !self.throttled.contains(&ev.cgroup_id)
                && self.consumers.values().any(|c| c.dir.id.0 == ev.cgroup_id)
            {
                return true;
            }
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
}

/// Waits for the next throttle event; never resolves without an event stream.
async fn recv(
    events: &mut Option<tokio::sync::mpsc::Receiver<crate::sensor::ThrottleEvent>>,
) -> Option<crate::sensor::ThrottleEvent> {
    match events {
        Some(rx) => match rx.recv().await {
            Some(ev) => Some(ev),
            None => {
                *events = None;
                std::future::pending().await
            }
        },
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::DecisionArgs;

    fn cfg() -> DecisionConfig {
        use clap::Parser as _;
        #[derive(clap::Parser)]
        struct A {
            #[command(flatten)]
            d: DecisionArgs,
        }
        A::try_parse_from(["x"]).unwrap().d.validate().unwrap()
    }

    /// A cgroup-v2-shaped consumer directory.
    fn consumer(root: &Path, name: &str, usage_us: u64) {
        let d = root.join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("cpu.max"), "20000 100000\n").unwrap();
        std::fs::write(d.join("cpu.weight"), "100\n").unwrap();
        std::fs::write(
            d.join("cpu.stat"),
            format!("usage_usec {usage_us}\nnr_periods 10\nnr_throttled 0\nthrottled_usec 0\n"),
        )
        .unwrap();
    }

    #[test]
    fn bad_files_are_counted_and_the_loop_keeps_running() {
        let tmp = tempfile::tempdir().unwrap();
        for n in ["good", "garbage", "unreadable", "removed"] {
            consumer(tmp.path(), n, 1000);
        }
        let args = LocalArgs {
            local_root: Some(tmp.path().to_owned()),
            capacity_millicores: Some(2000),
            on_exit: OnExit::Restore,
            sensor: SensorMode::Poll,
            report_jsonl: None,
        };
        let mut lp = LocalLoop::new(&args, cfg(), false).unwrap();
        let first = lp.round().unwrap();
        assert_eq!(first.rows.len(), 4);
        // Garbage in one cpu.stat, a cpu.stat that cannot be read as a file, a consumer removed.
        std::fs::write(tmp.path().join("garbage/cpu.stat"), "usage_usec lots\n").unwrap();
        let unreadable = tmp.path().join("unreadable/cpu.stat");
        std::fs::remove_file(&unreadable).unwrap();
        std::fs::create_dir(&unreadable).unwrap();
        std::fs::remove_dir_all(tmp.path().join("removed")).unwrap();
        let second = lp.round().unwrap();
        let keys: Vec<&str> = second.rows.iter().map(|r| r.key.as_str()).collect();
        assert_eq!(
            keys,
            vec!["good"],
            "only the healthy consumer is decided this round"
        );
        let st = lp.stats();
        assert_eq!(st.errors.get("malformed"), Some(&1), "{st:?}");
        assert_eq!(st.errors.get("unreadable"), Some(&1), "{st:?}");
        assert_eq!(st.consumers_removed, 1, "{st:?}");
        // Repaired files are picked up again.
        std::fs::write(
            tmp.path().join("garbage/cpu.stat"),
            "usage_usec 5000\nnr_periods 20\nnr_throttled 0\nthrottled_usec 0\n",
        )
        .unwrap();
        let third = lp.round().unwrap();
        assert_eq!(third.rows.len(), 2);
        assert_eq!(lp.stats().rounds, 3);
    }

    #[test]
    fn bad_arguments_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let mut args = LocalArgs {
            local_root: None,
            capacity_millicores: None,
            on_exit: OnExit::Keep,
            sensor: SensorMode::Poll,
            report_jsonl: None,
        };
        assert!(matches!(
            LocalLoop::new(&args, cfg(), false),
            Err(LocalError::NoRoot)
        ));
        args.local_root = Some(tmp.path().join("missing"));
        assert!(matches!(
            LocalLoop::new(&args, cfg(), false),
            Err(LocalError::BadRoot { .. })
        ));
        args.local_root = Some(tmp.path().to_owned());
        args.capacity_millicores = Some(0);
        assert!(matches!(
            LocalLoop::new(&args, cfg(), false),
            Err(LocalError::ZeroCapacity)
        ));
    }
}
