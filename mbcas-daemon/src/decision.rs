//! The decision loop both modes run: sensor → counters → [`Engine`] → actuator.
//!
//! A [`Mode`] says who the consumers are each round (local mode: the child
//! cgroups of `--local-root`; Kubernetes mode: this node's managed pods joined
//! to their pod cgroups) and how a changed decision is carried out (a quota
//! write, or a PodAllocation the resize controller applies). Everything else is
//! here, once: the pacing (a round every `--tick`, and `--debounce` after a
//! consumer starts being throttled), reading counters and pressure through the
//! sensor, the engine step, the metrics, and the stop.
//!
//! With the eBPF run-queue program, the loop also watches the consumers' wait
//! between rounds (every [`WAIT_WATCH_EVERY`], map reads only) and wakes as a
//! throttle onset does when contention starts or ends: a consumer whose wait
//! rate jumps by [`WAIT_JUMP_M`] over its rate in the last round (a
//! neighbour's threads now hold the CPUs it wants), or the uncapped
//! consumers' wait falling by as much in total (the contention eased: a
//! capped neighbour may have its share of the idle CPU back). The contention
//! cap and its release then land within a few hundred milliseconds instead
//! of up to a tick later.
//!
//! A consumer whose counters cannot be read this round is left out of it (its
//! limit stays) and reported to the mode; an engine error skips the round. Only
//! the mode's actuator can end the loop with an error (local mode: the round
//! report cannot be written).

use std::{
    collections::{HashMap, HashSet},
    future::Future,
    time::Duration,
};

use tokio::{sync::mpsc, time::Instant};
use tokio_util::sync::CancellationToken;

use crate::{
    cgroup::{CgroupDir, Hierarchy, files},
    demand::Counters,
    engine::{ConsumerInput, Engine, EngineConfig, NodeInput, StepOutcome},
    error::error_chain,
    metrics::{Metrics, NodePressure, PodLabels},
    node_stats::NodeStats,
    sensor::{CgroupCounters, Sensor, SensorError, ThrottleEvent},
    units::{CgroupId, MilliCpu, PodKey},
};

/// One consumer in this round, as the mode found it.
#[derive(Clone, Debug)]
pub struct Consumer {
    pub key: PodKey,
    pub dir: CgroupDir,
    /// Its series on `/metrics`.
    pub labels: PodLabels,
    /// The limit in effect now.
    pub current: MilliCpu,
    /// The limit when MBCAS first saw it.
    pub original: MilliCpu,
    pub weight: f64,
    pub floor: MilliCpu,
    pub cap: MilliCpu,
    /// See [`ConsumerInput::window_limit`].
    pub window_limit: Option<MilliCpu>,
    /// See [`ConsumerInput::demoted`].
    pub demoted: bool,
    /// Its parts with counters of their own (Kubernetes mode: the pod's
    /// container cgroups; empty in local mode).
    pub parts: Vec<Part>,
}

/// A part of a consumer with counters of its own: a container cgroup inside
/// a pod cgroup. The kernel does not add a child's throttling to its parent's
/// `cpu.stat` (a container held by its own quota leaves the pod's counters
/// clean), so the loop adds the parts' throttling to the consumer's
/// ([`merge_parts`]): a pod is throttled when any of its containers is. It
/// also measures each part's need, by which the mode splits the consumer's
/// limit.
#[derive(Clone, Debug)]
pub struct Part {
    pub name: String,
    pub dir: CgroupDir,
    /// What it used and was throttled over the last window (millicores; its
    /// run-queue wait is not its quota's doing); set by the loop once the
    /// part was read twice.
    pub need: Option<MilliCpu>,
}

/// Who takes part in this round, and what the node offers them.
#[derive(Clone, Debug)]
pub struct Census {
    pub node: NodeInput,
    pub consumers: Vec<Consumer>,
}

/// Why a consumer's counters could not be used this round.
#[derive(Debug)]
pub enum Unreadable {
    Failed(SensorError),
    /// The cgroup has no CPU usage counter (v1 without `cpuacct`).
    NoUsage,
}

impl Unreadable {
    /// A short, bounded label for metrics and counts.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Failed(e) => e.kind(),
            Self::NoUsage => "no_usage",
        }
    }
}

/// What differs between local mode and Kubernetes mode.
pub trait Mode {
    type Error: std::error::Error + Send + Sync + 'static;

    /// This round's consumers; `None` when no decision can be made this round
    /// (the mode says why in its log).
    fn census(&mut self) -> Option<Census>;

    /// A consumer of the census whose counters could not be read; it sits this
    /// round out.
    fn unreadable(&mut self, consumer: &Consumer, why: &Unreadable);

    /// Carries out the round's decisions (`outcome.rows`, in the order of
    /// `consumers`: only the changed ones need acting on).
    fn actuate(
        &mut self,
        now: Duration,
        consumers: &[Consumer],
        outcome: &StepOutcome,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Called once when the loop stops, also after an error.
    fn finish(&mut self) {}
}

/// How often the consumers' run-queue wait is checked between rounds.
pub const WAIT_WATCH_EVERY: Duration = Duration::from_millis(100);
/// A jump of a consumer's wait rate (thread-millicores) over its last round's
/// that wakes the loop.
pub const WAIT_JUMP_M: f64 = 200.0;

/// One consumer's wait, as the watch between rounds sees it.
#[derive(Clone, Debug)]
struct WaitWatch {
    /// Its cgroup and the descendants whose wait adds up to its own.
    ids: Vec<CgroupId>,
    /// Its wait rate in the last round's window, thread-millicores.
    rate_m: f64,
    /// Held to its share in the last round (quota or weight): its wait moves
    /// with its own hold, and a fall of it says nothing about the others.
    capped: bool,
}

/// Pacing of the loop.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Pacing {
    /// A round at least this often.
    pub tick: Duration,
    /// After the onset of throttling, wait this long for the burst to settle.
    pub debounce: Duration,
    /// Consumers whose throttled-period ratio is above this are known throttled:
    /// their events do not wake the loop.
    pub throttled_threshold: f64,
}

/// What the loop did, for the logs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoopCounts {
    pub rounds: u64,
    pub skipped_rounds: u64,
    pub engine_errors: u64,
    /// Throttle events received.
    pub events: u64,
    /// Rounds started early by the onset of throttling.
    pub woken: u64,
    /// Of those, rounds started early by a jump of a consumer's run-queue wait.
    pub woken_by_wait: u64,
}

pub struct DecisionLoop<M> {
    mode: M,
    sensor: Sensor,
    engine: Engine,
    metrics: Metrics,
    pacing: Pacing,
    start: Instant,
    /// Cgroup ids of this round's consumers.
    ids: HashSet<CgroupId>,
    /// The consumer each of this round's parts belongs to, by cgroup id.
    owners: HashMap<CgroupId, CgroupId>,
    /// Each part's last reading: when, and its raw demand counter (ns).
    part_last: HashMap<CgroupId, (u64, u64)>,
    /// Cgroup ids of the consumers throttled in the last round.
    throttled: HashSet<CgroupId>,
    /// The consumers' wait, watched between rounds (eBPF run-queue program only).
    waits: Vec<WaitWatch>,
    counts: LoopCounts,
    /// Where the engine's state is kept across restarts, and when it was
    /// last saved.
    state: Option<(std::path::PathBuf, Option<Instant>)>,
    /// The whole node's CPU, memory and pressure.
    node_stats: NodeStats,
}

impl<M: Mode> DecisionLoop<M> {
    pub fn new(
        mode: M,
        sensor: Sensor,
        engine: EngineConfig,
        pacing: Pacing,
        metrics: Metrics,
    ) -> Self {
        metrics.set_sensor_mode(sensor.kind().as_str());
        Self {
            mode,
            sensor,
            engine: Engine::new(engine),
            metrics,
            pacing,
            start: Instant::now(),
            ids: HashSet::new(),
            owners: HashMap::new(),
            part_last: HashMap::new(),
            throttled: HashSet::new(),
            waits: Vec::new(),
            counts: LoopCounts::default(),
            state: None,
            node_stats: NodeStats::new(),
        }
    }

    /// Keeps the engine's state in `path` across restarts: when the loop
    /// starts it takes back what the file holds (see [`crate::state`]); it
    /// saves it every [`crate::state::SAVE_EVERY`] and when it stops.
    pub fn with_state_file(mut self, path: std::path::PathBuf) -> Self {
        self.state = Some((path, None));
        self
    }

    /// Takes back the saved state, if there is one to take.
    fn restore_state(&mut self) {
        let Some((path, _)) = &self.state else {
            return;
        };
        let shown = path.display().to_string();
        match crate::state::load(path, crate::state::unix_ms_now()) {
            Ok(crate::state::Loaded::Fresh(saved, age)) => {
                let n = saved.len();
                let taken = self.engine.restore(saved, self.start.elapsed(), age);
                self.metrics.set_state_restored(taken);
                tracing::info!(file = %shown, consumers = n, restored = taken, age = ?age, "decision state restored");
            }
            Ok(crate::state::Loaded::Stale(age)) => {
                tracing::info!(file = %shown, age = ?age, "saved decision state too old (or from the future): starting afresh");
            }
            Ok(crate::state::Loaded::Absent) => {
                tracing::info!(file = %shown, "no saved decision state: starting afresh");
            }
            Err(e) => {
                tracing::warn!(error = %error_chain(&e), "saved decision state not usable: starting afresh (it is overwritten)");
            }
        }
    }

    /// Saves the engine's state when it is due (`force`: now).
    fn save_state(&mut self, force: bool) {
        let Some((path, last)) = &mut self.state else {
            return;
        };
        if !force && last.is_some_and(|t| t.elapsed() < crate::state::SAVE_EVERY) {
            return;
        }
        *last = Some(Instant::now());
        let saved = self.engine.save(self.start.elapsed());
        let n = saved.len();
        match crate::state::save(path, saved, crate::state::unix_ms_now()) {
            Ok(()) => tracing::debug!(consumers = n, "decision state saved"),
            Err(e) => {
                self.metrics.inc_state_save_failures();
                tracing::warn!(error = %error_chain(&e), "decision state not saved: a restart would start afresh");
            }
        }
    }

    pub fn mode(&self) -> &M {
        &self.mode
    }

    pub fn counts(&self) -> LoopCounts {
        self.counts
    }

    /// One round: census, read, decide, actuate, export. `Ok(None)`: no
    /// decision this round (no census, or the engine refused the inputs).
    pub async fn round(&mut self) -> Result<Option<StepOutcome>, M::Error> {
        let timer = self.metrics.loop_timer();
        let Some(census) = self.mode.census() else {
            self.counts.skipped_rounds += 1;
            return Ok(None);
        };
        let now = self.start.elapsed();
        let at_ns = u64::try_from(now.as_nanos()).unwrap_or(u64::MAX);
        let mut consumers = Vec::with_capacity(census.consumers.len());
        let mut inputs = Vec::with_capacity(census.consumers.len());
        let mut wait_ids = Vec::with_capacity(census.consumers.len());
        let mut part_now = HashMap::new();
        for mut c in census.consumers {
            match self.read(&mut c, at_ns, &mut part_now) {
                Ok((counters, ids)) => {
                    wait_ids.push(ids);
                    inputs.push(ConsumerInput {
                        key: c.key.clone(),
                        counters,
                        current: c.current,
                        original: c.original,
                        weight: c.weight,
                        floor: c.floor,
                        cap: c.cap,
                        exclusion: None,
                        window_limit: c.window_limit,
                        demoted: c.demoted,
                    });
                    consumers.push(c);
                }
                Err(why) => self.mode.unreadable(&c, &why),
            }
        }
        self.ids = consumers.iter().map(|c| c.dir.id).collect();
        self.owners = consumers
            .iter()
            .flat_map(|c| c.parts.iter().map(|p| (p.dir.id, c.dir.id)))
            .collect();
        self.part_last = part_now;
        let outcome = match self.engine.step(now, &census.node, &inputs) {
            Ok(o) => o,
            Err(e) => {
                self.counts.engine_errors += 1;
                tracing::warn!(error = %error_chain(&e), "no decisions this round");
                return Ok(None);
            }
        };
        self.counts.rounds += 1;
        let threshold = self.pacing.throttled_threshold;
        self.throttled = outcome
            .rows
            .iter()
            .zip(&consumers)
            .filter(|(r, _)| r.estimate.is_some_and(|e| e.throttled_ratio > threshold))
            .map(|(_, c)| c.dir.id)
            .collect();
        self.waits = if self.sensor.watches_wait() {
            outcome
                .rows
                .iter()
                .zip(wait_ids)
                .map(|(r, ids)| WaitWatch {
                    ids,
                    rate_m: r.estimate.map_or(0.0, |e| e.wait),
                    capped: r.contended.is_some(),
                })
                .collect()
        } else {
            Vec::new()
        };
        let acted = self.mode.actuate(now, &consumers, &outcome).await;
        self.export(&consumers, &outcome);
        drop(timer);
        acted.map(|()| Some(outcome))
    }

    /// The consumer's counters now, with its pressure on v2 and its parts'
    /// throttling, and the cgroup ids its wait was summed over (see
    /// [`Sensor::read_watched`]). Sets each part's need from its last reading
    /// (in `part_now` for the next round); a part that cannot be read is left
    /// out of this round's sums.
    fn read(
        &self,
        c: &mut Consumer,
        at_ns: u64,
        part_now: &mut HashMap<CgroupId, (u64, u64)>,
    ) -> Result<(Counters, Vec<CgroupId>), Unreadable> {
        let dir = &c.dir;
        let (own, ids) = self.sensor.read_watched(dir).map_err(Unreadable::Failed)?;
        let psi = if dir.hierarchy == Hierarchy::V2 {
            files::read_pressure_some_ns(&dir.path)
                .map_err(|e| Unreadable::Failed(SensorError::Cgroup(e)))?
        } else {
            None
        };
        let usage_ns = own.usage_ns.ok_or(Unreadable::NoUsage)?;
        let mut parts = Vec::with_capacity(c.parts.len());
        for part in &mut c.parts {
            // Its wait is already in the consumer's (summed over the subtree).
            let counters = match self.sensor.read_cpu(&part.dir) {
                Ok(p) => p,
                Err(e) => {
                    tracing::debug!(cgroup = %part.dir.path.display(), error = %error_chain(&e), "container counters not read");
                    continue;
                }
            };
            // What a container's own quota decides: its use and the time it
            // held it back. Its wait is not read: a container waits behind
            // other cgroups' threads whatever its quota (an idle sidecar
            // waking a hundred times a second waited ~200 m on the test
            // node's busy CPUs to use 10 m).
            let raw = counters
                .usage_ns
                .unwrap_or(0)
                .saturating_add(counters.throttled_ns);
            part.need = self
                .part_last
                .get(&part.dir.id)
                .and_then(|&before| rate_m(before, (at_ns, raw)));
            part_now.insert(part.dir.id, (at_ns, raw));
            parts.push(counters);
        }
        let mut counters = Counters {
            at_ns,
            usage_ns,
            throttled_ns: own.throttled_ns,
            nr_periods: own.nr_periods,
            nr_throttled: own.nr_throttled,
            psi_some_ns: psi,
            wait_ns: own.wait_ns,
        };
        merge_parts(&mut counters, &parts);
        Ok((counters, ids))
    }

    fn export(&mut self, consumers: &[Consumer], outcome: &StepOutcome) {
        let m = &self.metrics;
        m.set_market(outcome.price, outcome.capacity, outcome.overcommitted);
        m.set_contention_level(outcome.contention_level);
        let mut node = NodePressure {
            capacity: outcome.capacity,
            ..NodePressure::default()
        };
        for (row, c) in outcome.rows.iter().zip(consumers) {
            if let Some(e) = row.estimate {
                node.demand_m += e.raw.min(c.cap.get() as f64);
                node.usage_m += e.usage;
                node.wait_m += e.wait;
                m.set_pod_demand(&c.labels, e.smoothed, row.need);
                m.set_pod_throttled_ratio(&c.labels, e.throttled_ratio);
                m.add_pod_runqueue_wait(&c.labels, e.wait / 1000.0 * e.window_s);
            }
            m.set_pod_allocation(&c.labels, row.to);
            m.inc_decision(row.reason.as_str());
        }
        m.retain_pods(consumers.iter().map(|c| &c.labels));
        m.set_node_pressure(&node);
        self.node_stats.export(&self.metrics);
        self.export_sensor_stats();
    }

    fn export_sensor_stats(&self) {
        if let Some(stats) = self.sensor.kernel_stats() {
            self.metrics.observe_kernel_stats(&stats);
        }
        self.metrics
            .observe_program_costs(&self.sensor.program_costs());
    }

    /// Runs rounds every `tick`, and `debounce` after the onset of throttling,
    /// until `shutdown`; then lets the mode finish. Returns the mode.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<M, M::Error> {
        self.restore_state();
        let result = self.pace(&shutdown).await;
        self.save_state(true);
        self.mode.finish();
        tracing::info!(counts = ?self.counts, "decision loop stopped");
        result.map(|()| self.mode)
    }

    async fn pace(&mut self, shutdown: &CancellationToken) -> Result<(), M::Error> {
        let mut events = self.sensor.take_events();
        loop {
            // A tick after each round's start, woken early or not: adding a
            // tick to a fixed schedule instead pushed the next tick a whole
            // tick further at every early round (four wake-ups in a second
            // left the loop without a round for four seconds).
            let next = Instant::now() + self.pacing.tick;
            let round = self.round().await;
            if round.is_err() {
                self.export_sensor_stats();
            }
            round?;
            self.save_state(false);
            let mut seen = 0;
            let woke = tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = tokio::time::sleep_until(next) => None,
                () = self.next_onset(&mut events, &mut seen) => Some(false),
                () = self.next_wait_jump() => Some(true),
            };
            self.count_events(seen);
            if let Some(by_wait) = woke {
                self.counts.woken += 1;
                self.counts.woken_by_wait += u64::from(by_wait);
                // Debounce: let a burst of events settle, then decide once.
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(()),
                    () = tokio::time::sleep(self.pacing.debounce) => {}
                }
                if let Some(rx) = events.as_mut() {
                    let mut n = 0;
                    while rx.try_recv().is_ok() {
                        n += 1;
                    }
                    self.count_events(n);
                }
            }
        }
    }

    fn count_events(&mut self, n: u64) {
        self.counts.events += n;
        self.metrics.add_ebpf_events(n);
    }

    /// Whether `ev` marks the onset of throttling of a consumer: its cgroup,
    /// or one of its parts', was not throttled in the last round.
    fn is_onset(&self, ev: &ThrottleEvent) -> bool {
        let id = CgroupId(ev.cgroup_id);
        let owner = if self.ids.contains(&id) {
            Some(id)
        } else {
            self.owners.get(&id).copied()
        };
        ev.kind == mbcas_common::EVENT_PERIOD_THROTTLED
            && owner.is_some_and(|o| !self.throttled.contains(&o))
    }

    /// Waits for an event that marks an onset; events of consumers already
    /// known throttled are counted (in `seen`) and left to the tick. Never
    /// resolves without an event stream.
    async fn next_onset(&self, events: &mut Option<mpsc::Receiver<ThrottleEvent>>, seen: &mut u64) {
        loop {
            let Some(rx) = events.as_mut() else {
                return std::future::pending().await;
            };
            let Some(ev) = rx.recv().await else {
                *events = None;
                continue;
            };
            *seen += 1;
            if self.is_onset(&ev) {
                return;
            }
        }
    }

    /// Resolves when a consumer's wait rate over the last
    /// [`WAIT_WATCH_EVERY`] exceeds its last round's by [`WAIT_JUMP_M`], or the
    /// uncapped consumers' total falls below their last round's by as much;
    /// never without the run-queue program or consumers.
    async fn next_wait_jump(&self) {
        if self.waits.is_empty() {
            return std::future::pending().await;
        }
        let total = |w: &WaitWatch| self.sensor.wait_of(&w.ids);
        let mut last: Vec<Option<u64>> = self.waits.iter().map(total).collect();
        let mut at = Instant::now();
        loop {
            tokio::time::sleep(WAIT_WATCH_EVERY).await;
            let secs = at.elapsed().as_secs_f64();
            at = Instant::now();
            let (mut uncapped_then, mut uncapped_now) = (0.0, 0.0);
            for (w, before) in self.waits.iter().zip(last.iter_mut()) {
                let now = total(w);
                if let (Some(b), Some(n)) = (*before, now)
                    && secs > 0.0
                {
                    let rate_m = n.saturating_sub(b) as f64 / 1e6 / secs;
                    if rate_m > w.rate_m + WAIT_JUMP_M {
                        return;
                    }
                    if !w.capped {
                        uncapped_then += w.rate_m;
                        uncapped_now += rate_m;
                    }
                }
                *before = now;
            }
            let any_capped = self.waits.iter().any(|w| w.capped);
            if any_capped && uncapped_now + WAIT_JUMP_M < uncapped_then {
                return;
            }
        }
    }
}

/// Adds the parts' throttling to a consumer's counters: throttled time is
/// summed (each run queue is throttled by its own quota), and a period counts
/// as throttled when the consumer's or any part's was, which the largest of
/// the counts bounds from below (the periods are the largest count too, so
/// the ratio stays within 0..1). Counters of a part that was replaced (a
/// container restarted) start again from zero: the sums then fall once, and
/// the demand model skips that one window.
pub fn merge_parts(counters: &mut Counters, parts: &[CgroupCounters]) {
    for p in parts {
        counters.throttled_ns = counters.throttled_ns.saturating_add(p.throttled_ns);
        counters.nr_throttled = counters.nr_throttled.max(p.nr_throttled);
        counters.nr_periods = counters.nr_periods.max(p.nr_periods);
    }
}

/// The rate of a nanosecond counter between two readings `(at_ns, value)`,
/// in millicores; `None` for an empty window or a counter that fell.
fn rate_m(before: (u64, u64), after: (u64, u64)) -> Option<MilliCpu> {
    let window = after.0.checked_sub(before.0).filter(|&w| w > 0)?;
    let delta = after.1.checked_sub(before.1)?;
    let m = delta as f64 / window as f64 * 1000.0;
    Some(MilliCpu(m.round() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(throttled_ns: u64, nr_periods: u64, nr_throttled: u64) -> CgroupCounters {
        CgroupCounters {
            id: CgroupId(7),
            nr_periods,
            nr_throttled,
            throttled_ns,
            usage_ns: Some(1),
            wait_ns: None,
        }
    }

    #[test]
    fn a_throttled_container_makes_its_pod_throttled() {
        // The pod's own quota never bound; its `app` container's did in 40 of
        // 50 periods, the idle sidecar's never.
        let mut pod = Counters {
            at_ns: 1,
            usage_ns: 5,
            throttled_ns: 0,
            nr_periods: 50,
            nr_throttled: 0,
            psi_some_ns: None,
            wait_ns: Some(3),
        };
        merge_parts(&mut pod, &[part(2_000, 50, 40), part(0, 12, 0)]);
        assert_eq!(pod.throttled_ns, 2_000);
        assert_eq!((pod.nr_periods, pod.nr_throttled), (50, 40));
        // What is not throttling stays the pod's own.
        assert_eq!((pod.usage_ns, pod.wait_ns), (5, Some(3)));
        // Two throttled parts: times add up, the ratio stays within 0..1.
        merge_parts(&mut pod, &[part(500, 60, 55)]);
        assert_eq!(pod.throttled_ns, 2_500);
        assert!(pod.nr_throttled <= pod.nr_periods);
    }

    #[test]
    fn part_rates_are_millicores_and_refuse_resets() {
        // 300 ms of demand over 1 s.
        assert_eq!(
            rate_m((1_000, 0), (1_000_001_000, 300_000_000)),
            Some(MilliCpu(300))
        );
        assert_eq!(rate_m((5, 10), (5, 20)), None);
        assert_eq!(rate_m((5, 10), (1_000_000_005, 9)), None);
    }
}
