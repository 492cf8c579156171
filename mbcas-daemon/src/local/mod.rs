//! Local mode: the MBCAS loop over plain cgroups, no Kubernetes.
//!
//! Every child directory of `--local-root` is a consumer: its weight is its
//! `cpu.shares` (v1) or `cpu.weight` (v2), its floor the `--min-limit`, its cap the
//! machine's capacity. [`Local`] is the [`Mode`] of the shared
//! [`crate::decision::DecisionLoop`]: each round it says who the consumers are,
//! and it writes the changed quotas directly.
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

use crate::{
    cgroup::{
        CgroupDir, CgroupFsError,
        files::{self, Quota},
    },
    config::DecisionConfig,
    decision::{Census, Consumer, Mode, Unreadable},
    engine::{NodeInput, StepOutcome},
    error::error_chain,
    metrics::PodLabels,
    sensor::{SensorError, SensorMode},
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
    /// Rounds decided.
    pub rounds: u64,
    pub quota_writes: u64,
    pub consumers_added: u64,
    pub consumers_removed: u64,
    pub external_changes: u64,
    /// Read/write errors by kind (`unreadable`, `malformed`, …).
    pub errors: BTreeMap<&'static str, u64>,
}

struct LocalConsumer {
    name: String,
    dir: CgroupDir,
    original: Quota,
    /// What MBCAS last wrote, to notice changes made by others.
    written: Option<MilliCpu>,
    /// Its weight while MBCAS holds it to its share under contention.
    demotion: Option<Demotion>,
}

/// A consumer's weight lowered by the weight lever (market rule 0): it takes
/// more than its share of what is wanted now, so it yields to every consumer
/// that wants no more than its share and gets what they leave.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Demotion {
    /// Its weight before (v2's scale), put back when the contention ends.
    original: f64,
}

/// What a held consumer's weight is multiplied by. The same factor for every
/// held consumer keeps their weights in proportion among themselves, so the
/// consumers that take more than their share split what the others leave by
/// weight, and none of them starves: a consumer that wanted more than its share
/// while the others were busy would itself be held. (Lowering each to the
/// hierarchy's minimum made two held consumers of weights 1:2 equal: the
/// kernel tier's contention test measured 836 m and 993 m where 610 m and
/// 1220 m were fair.) 1/64 of a 512-share consumer is 8 shares against its
/// neighbours' 1024.
const DEMOTION_FACTOR: f64 = 1.0 / 8.0;

/// The engine configuration local mode runs: the decision flags, with the
/// weight lever (local mode owns its cgroups, so it can lower a weight; a
/// lowered weight holds a neighbour to its share within the scheduler's
/// wake-up, not a round later, and throttles nothing).
pub fn engine_config(cfg: &DecisionConfig) -> crate::engine::EngineConfig {
    crate::engine::EngineConfig {
        lever: crate::market::Lever::Weight,
        ..cfg.engine()
    }
}

/// One consumer in a round report.
#[derive(Debug, Serialize)]
pub struct ConsumerReport<'a> {
    pub name: &'a str,
    pub weight: f64,
    pub usage_m: Option<f64>,
    /// Run-queue wait of the last window (thread-time, millicores).
    pub wait_m: Option<f64>,
    /// Raw demand of the last window: usage + throttled + wait.
    pub raw_demand_m: Option<f64>,
    pub demand_m: Option<f64>,
    pub need_m: u64,
    pub allocation_m: u64,
    pub limit_m: u64,
    pub throttled_ratio: f64,
    pub reason: &'static str,
    pub changed: bool,
    /// Held to its share under contention (market rule 0), millicores.
    pub contended_m: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct RoundReport<'a> {
    pub t: f64,
    pub capacity_m: u64,
    pub price: f64,
    /// The market's contention level (0: not contended in the last window).
    pub contention_level: f64,
    pub overcommitted: bool,
    pub consumers: Vec<ConsumerReport<'a>>,
}

/// Local mode as a [`Mode`]: the child cgroups of `--local-root`, quotas
/// written directly.
pub struct Local {
    root: PathBuf,
    capacity: MilliCpu,
    cfg: DecisionConfig,
    on_exit: OnExit,
    consumers: BTreeMap<String, LocalConsumer>,
    stats: LoopStats,
    report: Option<Box<dyn std::io::Write + Send>>,
    report_path: PathBuf,
}

fn default_capacity() -> MilliCpu {
    MilliCpu(std::thread::available_parallelism().map_or(1, |n| n.get() as u64) * 1000)
}

impl Local {
    /// Validates the arguments and opens the round report.
    pub fn new(args: &LocalArgs, cfg: DecisionConfig) -> Result<Self, LocalError> {
        let root = args.local_root.clone().ok_or(LocalError::NoRoot)?;
        if !root.is_dir() {
            return Err(LocalError::BadRoot { path: root });
        }
        let capacity = match args.capacity_millicores {
            Some(0) => return Err(LocalError::ZeroCapacity),
            Some(n) => MilliCpu(n),
            None => default_capacity(),
        };
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
        tracing::info!(root = %root.display(), capacity = %capacity, "local mode");
        Ok(Self {
            root,
            capacity,
            cfg,
            on_exit: args.on_exit,
            consumers: BTreeMap::new(),
            stats: LoopStats::default(),
            report,
            report_path,
        })
    }

    /// Whether the arguments were refused (exit 64) rather than the machine.
    pub fn is_usage_error(e: &LocalError) -> bool {
        matches!(
            e,
            LocalError::NoRoot | LocalError::BadRoot { .. } | LocalError::ZeroCapacity
        )
    }

    pub fn stats(&self) -> &LoopStats {
        &self.stats
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn count_error(&mut self, kind: &'static str) {
        *self.stats.errors.entry(kind).or_default() += 1;
    }

    fn forget(&mut self, name: &str, why: &str) {
        if self.consumers.remove(name).is_some() {
            tracing::warn!(consumer = %name, "consumer cgroup {why}; forgetting it");
            self.stats.consumers_removed += 1;
        }
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
        let gone: Vec<String> = self
            .consumers
            .keys()
            .filter(|k| !seen.iter().any(|(n, _)| n == *k))
            .cloned()
            .collect();
        for name in gone {
            self.forget(&name, "removed");
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
                        LocalConsumer {
                            name,
                            dir,
                            original,
                            written: None,
                            demotion: None,
                        },
                    );
                    self.stats.consumers_added += 1;
                }
                Err(e) => {
                    tracing::warn!(consumer = %name, error = %error_chain(&e), "cannot use consumer");
                    self.count_error(e.kind());
                }
            }
        }
    }

    /// A consumer's current quota and weight; `None` (counted) when unreadable.
    fn limits(&mut self, name: &str) -> Option<(MilliCpu, f64)> {
        let c = self.consumers.get(name)?;
        let read = files::read_quota(&c.dir.path, c.dir.hierarchy)
            .and_then(|q| Ok((q, files::read_weight(&c.dir.path, c.dir.hierarchy)?)));
        let (quota, weight) = match read {
            Ok(v) => v,
            Err(CgroupFsError::Vanished { .. }) => {
                self.forget(name, "vanished");
                return None;
            }
            Err(e) => {
                tracing::warn!(consumer = %name, error = %error_chain(&e), "skipping consumer this round");
                self.count_error(e.kind());
                return None;
            }
        };
        let current = quota.millicores().unwrap_or(self.capacity);
        let c = self.consumers.get_mut(name)?;
        // A demoted consumer bids with the weight it had.
        let weight = c.demotion.map_or(weight, |d| d.original);
        if let Some(w) = c.written
            && w != current
        {
            tracing::warn!(consumer = %name, wrote = %w, found = %current, "quota changed behind MBCAS's back; taking it as the current limit");
            self.stats.external_changes += 1;
            c.written = None;
        }
        Some((current, weight))
    }

    /// The weight lever: lowers the weight of each consumer the market holds
    /// to its share (× [`DEMOTION_FACTOR`]) and puts it back when the
    /// contention ends.
    fn apply_weights(&mut self, consumers: &[Consumer], outcome: &StepOutcome) {
        for (row, input) in outcome.rows.iter().zip(consumers) {
            let Some(c) = self.consumers.get_mut(row.key.as_str()) else {
                continue;
            };
            let next = match (row.contended, c.demotion) {
                (Some(_), None) => Some(Demotion {
                    original: input.weight,
                }),
                (Some(_), held) => held,
                (None, _) => None,
            };
            if next == c.demotion {
                continue;
            }
            let (weight, what) = match (next, c.demotion) {
                (Some(d), _) => (d.original * DEMOTION_FACTOR, "weight lowered"),
                (None, Some(d)) => (d.original, "weight restored"),
                (None, None) => continue,
            };
            match files::write_weight(&c.dir.path, c.dir.hierarchy, weight) {
                Ok(written) => {
                    tracing::info!(consumer = %row.key, weight = written, share = ?row.contended, "{what}");
                    c.demotion = next;
                }
                Err(CgroupFsError::Vanished { .. }) => {
                    let name = row.key.to_string();
                    self.forget(&name, "vanished");
                }
                Err(e) => {
                    tracing::warn!(consumer = %row.key, error = %error_chain(&e), "cannot write weight");
                    self.count_error(e.kind());
                }
            }
        }
    }

    fn write_report(
        &mut self,
        now: Duration,
        consumers: &[Consumer],
        o: &StepOutcome,
    ) -> Result<(), LocalError> {
        let Some(out) = self.report.as_mut() else {
            return Ok(());
        };
        let consumers = o
            .rows
            .iter()
            .zip(consumers)
            .map(|(r, c)| ConsumerReport {
                name: r.key.as_str(),
                weight: c.weight,
                usage_m: r.estimate.map(|e| e.usage),
                wait_m: r.estimate.map(|e| e.wait),
                raw_demand_m: r.estimate.map(|e| e.raw),
                demand_m: r.estimate.map(|e| e.smoothed),
                need_m: r.need.0,
                allocation_m: r.allocation.0,
                limit_m: r.to.0,
                throttled_ratio: r.estimate.map_or(0.0, |e| e.throttled_ratio),
                reason: r.reason.as_str(),
                changed: r.changed(),
                contended_m: r.contended.map(|m| m.0),
            })
            .collect();
        let line = RoundReport {
            t: now.as_secs_f64(),
            capacity_m: o.capacity.0,
            price: o.price,
            contention_level: o.contention_level,
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
}

impl Mode for Local {
    type Error = LocalError;

    fn census(&mut self) -> Option<Census> {
        self.discover();
        let names: Vec<String> = self.consumers.keys().cloned().collect();
        let market = self.cfg.market;
        let mut consumers = Vec::with_capacity(names.len());
        for name in names {
            let Some((current, weight)) = self.limits(&name) else {
                continue;
            };
            let Some(c) = self.consumers.get(&name) else {
                continue;
            };
            let original = c.original.millicores().unwrap_or(self.capacity);
            consumers.push(Consumer {
                key: PodKey::from(name.as_str()),
                dir: c.dir.clone(),
                labels: PodLabels::new("", name.as_str()),
                current,
                original,
                weight,
                floor: market.min_limit,
                cap: market.cap(original, market.min_limit, self.capacity),
                // Local mode writes the quota itself, at once.
                window_limit: None,
                demoted: c.demotion.is_some(),
                parts: Vec::new(),
            });
        }
        Some(Census {
            node: NodeInput::new(self.capacity),
            consumers,
        })
    }

    fn unreadable(&mut self, consumer: &Consumer, why: &Unreadable) {
        let name = consumer.key.as_str();
        match why {
            Unreadable::Failed(SensorError::Cgroup(CgroupFsError::Vanished { .. })) => {
                self.forget(name, "vanished");
            }
            Unreadable::Failed(e) => {
                tracing::warn!(consumer = %name, error = %error_chain(e), "skipping consumer this round");
                self.count_error(why.kind());
            }
            Unreadable::NoUsage => {
                tracing::warn!(consumer = %name, "no CPU usage counter for this cgroup; skipping");
                self.count_error(why.kind());
            }
        }
    }

    async fn actuate(
        &mut self,
        now: Duration,
        consumers: &[Consumer],
        outcome: &StepOutcome,
    ) -> Result<(), LocalError> {
        self.stats.rounds += 1;
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
                Err(CgroupFsError::Vanished { .. }) => {
                    // Removed since the census: nothing to write to.
                    let name = row.key.to_string();
                    self.forget(&name, "vanished");
                }
                Err(e) => {
                    tracing::warn!(consumer = %row.key, error = %error_chain(&e), "cannot write quota");
                    self.count_error(e.kind());
                }
            }
        }
        self.apply_weights(consumers, outcome);
        self.write_report(now, consumers, outcome)
    }

    /// Applies `--on-exit`.
    fn finish(&mut self) {
        if self.on_exit == OnExit::Keep {
            tracing::info!("leaving the quotas as they are (--on-exit keep)");
            return;
        }
        for c in self.consumers.values_mut() {
            if let Some(d) = c.demotion.take() {
                match files::write_weight(&c.dir.path, c.dir.hierarchy, d.original) {
                    Ok(_) => {
                        tracing::info!(consumer = %c.name, weight = d.original, "weight restored")
                    }
                    Err(e) => {
                        tracing::warn!(consumer = %c.name, error = %error_chain(&e), "cannot restore weight")
                    }
                }
            }
            match files::write_quota(&c.dir.path, c.dir.hierarchy, c.original) {
                Ok(()) => {
                    tracing::info!(consumer = %c.name, quota = ?c.original.millicores(), "quota restored")
                }
                Err(e) => {
                    tracing::warn!(consumer = %c.name, error = %error_chain(&e), "cannot restore quota")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::{config::DecisionArgs, decision::DecisionLoop, metrics::Metrics, sensor::Sensor};

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

    fn decision_loop(args: &LocalArgs) -> DecisionLoop<Local> {
        let cfg = cfg();
        let (engine, pacing) = (engine_config(&cfg), cfg.pacing());
        let local = Local::new(args, cfg).unwrap();
        let sensor = Sensor::start(SensorMode::Poll, false).unwrap();
        DecisionLoop::new(local, sensor, engine, pacing, Metrics::new())
    }

    fn rows(o: Option<StepOutcome>) -> Vec<String> {
        o.expect("a decision")
            .rows
            .iter()
            .map(|r| r.key.to_string())
            .collect()
    }

    #[tokio::test]
    async fn bad_files_are_counted_and_the_loop_keeps_running() {
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
        let mut lp = decision_loop(&args);
        assert_eq!(rows(lp.round().await.unwrap()).len(), 4);
        // Garbage in one cpu.stat, a cpu.stat that cannot be read as a file, a consumer removed.
        std::fs::write(tmp.path().join("garbage/cpu.stat"), "usage_usec lots\n").unwrap();
        let unreadable = tmp.path().join("unreadable/cpu.stat");
        std::fs::remove_file(&unreadable).unwrap();
        std::fs::create_dir(&unreadable).unwrap();
        std::fs::remove_dir_all(tmp.path().join("removed")).unwrap();
        assert_eq!(
            rows(lp.round().await.unwrap()),
            vec!["good"],
            "only the healthy consumer is decided this round"
        );
        let st = lp.mode().stats();
        assert_eq!(st.errors.get("malformed"), Some(&1), "{st:?}");
        assert_eq!(st.errors.get("unreadable"), Some(&1), "{st:?}");
        assert_eq!(st.consumers_removed, 1, "{st:?}");
        // Repaired files are picked up again.
        std::fs::write(
            tmp.path().join("garbage/cpu.stat"),
            "usage_usec 5000\nnr_periods 20\nnr_throttled 0\nthrottled_usec 0\n",
        )
        .unwrap();
        assert_eq!(rows(lp.round().await.unwrap()).len(), 2);
        assert_eq!(lp.mode().stats().rounds, 3);
        assert_eq!(lp.counts().rounds, 3);
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
        assert!(matches!(Local::new(&args, cfg()), Err(LocalError::NoRoot)));
        args.local_root = Some(tmp.path().join("missing"));
        assert!(matches!(
            Local::new(&args, cfg()),
            Err(LocalError::BadRoot { .. })
        ));
        args.local_root = Some(tmp.path().to_owned());
        args.capacity_millicores = Some(0);
        assert!(matches!(
            Local::new(&args, cfg()),
            Err(LocalError::ZeroCapacity)
        ));
    }
}
