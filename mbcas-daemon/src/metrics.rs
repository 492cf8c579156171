//! The daemon's Prometheus metrics (OpenMetrics text, served on `/metrics`).
//!
//! One [`Metrics`] value holds every metric; it is cheap to clone (each metric
//! is reference-counted) and is handed to every task that records something.
//! All names carry the `mbcas_` prefix. Label sets are typed and bounded:
//!
//! | metric | type | labels |
//! | --- | --- | --- |
//! | `mbcas_build_info` | info | `version` |
//! | `mbcas_pod_demand_cores` | gauge | `namespace`, `pod` |
//! | `mbcas_pod_need_cores` | gauge | `namespace`, `pod` |
//! | `mbcas_pod_allocation_cores` | gauge | `namespace`, `pod` |
//! | `mbcas_pod_throttled_ratio` | gauge | `namespace`, `pod` |
//! | `mbcas_pod_runqueue_wait_seconds_total` | counter | `namespace`, `pod` |
//! | `mbcas_market_contention_level` | gauge | – |
//! | `mbcas_market_clearing_price` | gauge | – |
//! | `mbcas_market_capacity_cores` | gauge | – |
//! | `mbcas_market_overcommitted` | gauge (0/1) | – |
//! | `mbcas_node_demand_cores` | gauge (Σ of the managed pods' demand in the last window: use + throttled + run-queue wait, each at most its cap; what the market's contention rule compares with the capacity) | – |
//! | `mbcas_node_usage_cores` | gauge (Σ of the managed pods' use in the last window) | – |
//! | `mbcas_node_unmet_demand_cores` | gauge (what the capacity could not give: demand − capacity, at least 0) | – |
//! | `mbcas_node_pressure_ratio` | gauge (demand ÷ capacity; above 1 the pods want more than the node gives them) | – |
//! | `mbcas_node_runqueue_wait_cores` | gauge (Σ of the managed pods' run-queue wait in the last window, thread-cores) | – |
//! | `mbcas_node_cpu_pressure_seconds_total` | counter (the node's `/proc/pressure/cpu` `some` total: time some task waited for a CPU; stays 0 without PSI) | – |
//! | `mbcas_node_cpu_busy_seconds_total` | counter (the node's busy CPU time, all CPUs, from `/proc/stat`; see [`crate::node_stats`]) | – |
//! | `mbcas_node_cpus` | gauge (the node's CPUs) | – |
//! | `mbcas_node_memory_usage_ratio` | gauge (1 − MemAvailable ÷ MemTotal) | – |
//! | `mbcas_node_memory_pressure_seconds_total` | counter (`/proc/pressure/memory` `some` total) | – |
//! | `mbcas_node_info` | gauge (1) | `node`: the node's name (Kubernetes mode) or host name (local mode); the node score rules join on it |
//! | `mbcas_decisions_total` | counter | `reason` (a [`crate::policy::Reason`] code) |
//! | `mbcas_resizes_total` | counter | `result`: `requested`, `applied`, `rejected` (the API refused), `error` (API unreachable), `kubelet_deferred`, `kubelet_infeasible`, `kubelet_error` (the kubelet's verdicts, when first seen), `operator_change` (someone else's resize adopted), `early_quota` (an increase written into the cgroups before the kubelet's pass), `early_quota_failed`, `early_quota_reverted` (put back after the kubelet's refusal) |
//! | `mbcas_resize_latency_seconds` | histogram | – |
//! | `mbcas_ebpf_events_total` | counter | – |
//! | `mbcas_ebpf_drops_total` | counter | `stage` (`ringbuf`: kernel side full, `channel`: reader's consumer too slow) |
//! | `mbcas_ebpf_program_run_time_seconds_total` | counter | `program` |
//! | `mbcas_ebpf_program_runs_total` | counter | `program` |
//! | `mbcas_sensor_mode` | gauge (1 for the active mode) | `mode` |
//! | `mbcas_node_lease_held` | gauge (0/1: this daemon holds its node's lease and may write) | – |
//! | `mbcas_weight_writes_total` | counter (Kubernetes mode's weight lever: pod cgroup weights written) | `result`: `lowered`, `restored`, `relowered` (put back after the kubelet reset it in carrying out a resize), `failed` |
//! | `mbcas_weight_lowered_pods` | gauge (Kubernetes mode: pods whose pod cgroup weight MBCAS holds lowered now) | – |
//! | `mbcas_state_restored_consumers` | gauge (pods whose decision state was taken back from `--state-file` at the start) | – |
//! | `mbcas_state_save_failures_total` | counter | – |
//! | `mbcas_loop_duration_seconds` | histogram | – |
//!
//! Per-pod series exist only for pods the daemon currently manages: call
//! [`Metrics::remove_pod`] when a pod goes, so the node's series count stays
//! bounded by its pod count. Every other label value is a `&'static str` code
//! chosen by the program (never `Debug` output or error text), so cardinality is
//! fixed at compile time.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex, atomic::AtomicU64},
    time::{Duration, Instant},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
        info::Info,
    },
    registry::{Registry, Unit},
};

use mbcas_common::{PROG_PERIOD_TIMER, PROG_SCHED_SWITCH};

use crate::{
    sensor::ebpf::{KernelStats, ProgramCost},
    units::MilliCpu,
};

/// `stage` of events lost because the kernel's ring buffer was full.
pub const DROP_RINGBUF: &str = "ringbuf";
/// `stage` of events lost because the daemon's consumer did not keep up.
pub const DROP_CHANNEL: &str = "channel";

/// The OpenMetrics content type `/metrics` is served with.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Labels of the per-pod series. In local mode `namespace` is empty and `pod` is
/// the consumer cgroup's name.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PodLabels {
    pub namespace: String,
    pub pod: String,
}

impl PodLabels {
    pub fn new(namespace: impl Into<String>, pod: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            pod: pod.into(),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProgramLabels {
    program: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabels {
    stage: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModeLabels {
    mode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

type F64Gauge = Gauge<f64, AtomicU64>;
type F64Counter = Counter<f64, AtomicU64>;

/// What one round saw of the node as a whole (the managed pods' sums).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct NodePressure {
    /// Σ demand in the last window (use + throttled + wait, each at most the
    /// pod's cap), millicores.
    pub demand_m: f64,
    pub usage_m: f64,
    /// Σ run-queue wait, thread-millicores.
    pub wait_m: f64,
    pub capacity: MilliCpu,
}

/// The node-level gauges (see the table above).
#[derive(Clone, Default)]
struct NodeGauges {
    demand: F64Gauge,
    usage: F64Gauge,
    unmet: F64Gauge,
    pressure: F64Gauge,
    wait: F64Gauge,
    psi: F64Counter,
    cpus: Gauge,
    busy: F64Counter,
    memory_usage: F64Gauge,
    memory_psi: F64Counter,
    info: Family<NodeLabels, Gauge>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeLabels {
    node: String,
}

/// Every metric of the daemon. Clone it freely: clones share the series.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    pod_demand: Family<PodLabels, F64Gauge>,
    pod_need: Family<PodLabels, F64Gauge>,
    pod_allocation: Family<PodLabels, F64Gauge>,
    pod_throttled_ratio: Family<PodLabels, F64Gauge>,
    pod_runqueue_wait: Family<PodLabels, F64Counter>,
    clearing_price: F64Gauge,
    contention_level: F64Gauge,
    capacity: F64Gauge,
    overcommitted: Gauge,
    decisions: Family<ReasonLabels, Counter>,
    resizes: Family<ResultLabels, Counter>,
    resize_latency: Histogram,
    ebpf_events: Counter,
    ebpf_drops: Family<StageLabels, Counter>,
    /// Last cumulative (events, ring-buffer drops, channel drops) of the sensor.
    kernel_last: Arc<Mutex<(u64, u64, u64)>>,
    ebpf_run_time: Family<ProgramLabels, F64Counter>,
    ebpf_runs: Family<ProgramLabels, Counter>,
    /// Last cumulative (run time ns, run count) seen per program, to turn the
    /// kernel's absolute `bpf_stats` values into counter increments.
    ebpf_last: Arc<Mutex<HashMap<&'static str, (u64, u64)>>>,
    sensor_mode: Family<ModeLabels, Gauge>,
    /// Modes that have a series (to zero them when the mode changes).
    modes: Arc<Mutex<HashSet<&'static str>>>,
    node_lease_held: Gauge,
    node: NodeGauges,
    weight_writes: Family<ResultLabels, Counter>,
    weight_lowered: Gauge,
    state_restored: Gauge,
    state_save_failures: Counter,
    /// Pods that have series (Family has no key iterator).
    pods: Arc<Mutex<HashSet<PodLabels>>>,
    loop_duration: Histogram,
}

/// Locks a mutex, carrying on through poisoning: the guarded sets stay valid
/// whatever a panicking holder did.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn millicores_to_cores(m: MilliCpu) -> f64 {
    m.get() as f64 / 1000.0
}

impl Metrics {
    /// Creates every metric in a fresh registry with the `mbcas` prefix.
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("mbcas");
        let m = Self {
            registry: Arc::new(Registry::default()),
            pod_demand: Family::default(),
            pod_need: Family::default(),
            pod_allocation: Family::default(),
            pod_throttled_ratio: Family::default(),
            pod_runqueue_wait: Family::default(),
            clearing_price: F64Gauge::default(),
            contention_level: F64Gauge::default(),
            capacity: F64Gauge::default(),
            overcommitted: Gauge::default(),
            decisions: Family::default(),
            resizes: Family::default(),
            // 10 ms … ≈ 82 s: a PATCH to the kubelet's report takes ~1 s normally.
            resize_latency: Histogram::new(exponential_buckets(0.01, 2.0, 14)),
            ebpf_events: Counter::default(),
            ebpf_drops: Family::default(),
            kernel_last: Arc::default(),
            ebpf_run_time: Family::default(),
            ebpf_runs: Family::default(),
            ebpf_last: Arc::default(),
            sensor_mode: Family::default(),
            modes: Arc::default(),
            node_lease_held: Gauge::default(),
            node: NodeGauges::default(),
            weight_writes: Family::default(),
            weight_lowered: Gauge::default(),
            state_restored: Gauge::default(),
            state_save_failures: Counter::default(),
            pods: Arc::default(),
            // 100 µs … ≈ 3.3 s: one decision pass over a node's pods.
            loop_duration: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
        };
        r.register(
            "build",
            "Version of the running mbcas daemon",
            Info::new(BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            }),
        );
        r.register(
            "pod_demand_cores",
            "Smoothed CPU demand of a managed pod, in cores",
            m.pod_demand.clone(),
        );
        r.register(
            "pod_need_cores",
            "CPU need (demand plus headroom) of a managed pod, in cores",
            m.pod_need.clone(),
        );
        r.register(
            "pod_allocation_cores",
            "CPU limit MBCAS allocated to a managed pod, in cores",
            m.pod_allocation.clone(),
        );
        r.register(
            "pod_throttled_ratio",
            "Fraction of CFS periods in the last window in which the pod was throttled",
            m.pod_throttled_ratio.clone(),
        );
        r.register(
            "pod_runqueue_wait_seconds",
            "Time the pod's threads were runnable but waiting for a CPU (thread-seconds: two threads waiting one second count two)",
            m.pod_runqueue_wait.clone(),
        );
        r.register(
            "market_contention_level",
            "Fair-share level of the last market run under contention now, in millicores per unit of weight (0 when the node was not contended)",
            m.contention_level.clone(),
        );
        r.register(
            "market_clearing_price",
            "Clearing level of the last market run, in millicores per unit of weight (0 when nothing is scarce)",
            m.clearing_price.clone(),
        );
        r.register(
            "market_capacity_cores",
            "CPU capacity the market could hand out in the last run, in cores",
            m.capacity.clone(),
        );
        r.register(
            "market_overcommitted",
            "1 when the pods' floors exceeded the capacity in the last market run",
            m.overcommitted.clone(),
        );
        r.register(
            "decisions",
            "Stability-policy decisions, by reason code",
            m.decisions.clone(),
        );
        r.register("resizes", "Pod resizes, by result", m.resizes.clone());
        r.register_with_unit(
            "resize_latency",
            "Time from the resize PATCH until the kubelet reports the new limit applied",
            Unit::Seconds,
            m.resize_latency.clone(),
        );
        r.register(
            "ebpf_events",
            "Throttle events read from the eBPF ring buffer",
            m.ebpf_events.clone(),
        );
        r.register(
            "ebpf_drops",
            "Throttle events lost: ring buffer full (stage=ringbuf) or consumer too slow (stage=channel)",
            m.ebpf_drops.clone(),
        );
        r.register_with_unit(
            "ebpf_program_run_time",
            "Kernel CPU time spent in each eBPF program (bpf_stats)",
            Unit::Seconds,
            m.ebpf_run_time.clone(),
        );
        r.register(
            "ebpf_program_runs",
            "Invocations of each eBPF program (bpf_stats)",
            m.ebpf_runs.clone(),
        );
        r.register(
            "sensor_mode",
            "1 for the sensor mode in use, 0 for modes used before",
            m.sensor_mode.clone(),
        );
        r.register(
            "node_lease_held",
            "1 while this daemon holds its node's lease (it may decide and write), 0 while it waits",
            m.node_lease_held.clone(),
        );
        let n = &m.node;
        for (name, help, g) in [
            (
                "node_demand_cores",
                "Sum of the managed pods' demand in the last window (use + throttled + run-queue wait, each at most its cap)",
                &n.demand,
            ),
            (
                "node_usage_cores",
                "Sum of the managed pods' CPU use in the last window",
                &n.usage,
            ),
            (
                "node_unmet_demand_cores",
                "Demand the node's capacity could not give in the last window (demand - capacity, at least 0)",
                &n.unmet,
            ),
            (
                "node_pressure_ratio",
                "The managed pods' demand divided by the capacity MBCAS shares between them",
                &n.pressure,
            ),
            (
                "node_runqueue_wait_cores",
                "Sum of the managed pods' run-queue wait in the last window, in thread-cores",
                &n.wait,
            ),
        ] {
            r.register(name, help, g.clone());
        }
        r.register(
            "node_cpu_pressure_seconds",
            "The node's CPU pressure stall time (/proc/pressure/cpu, some): time some task waited for a CPU",
            n.psi.clone(),
        );
        r.register(
            "node_cpu_busy_seconds",
            "The node's CPU time spent busy, all CPUs (/proc/stat: all but idle and iowait)",
            n.busy.clone(),
        );
        r.register("node_cpus", "The node's CPUs (/proc/stat)", n.cpus.clone());
        r.register(
            "node_memory_usage_ratio",
            "The share of the node's memory in use (/proc/meminfo: 1 - MemAvailable / MemTotal)",
            n.memory_usage.clone(),
        );
        r.register(
            "node_memory_pressure_seconds",
            "The node's memory pressure stall time (/proc/pressure/memory, some): time some task waited for memory",
            n.memory_psi.clone(),
        );
        r.register(
            "node_info",
            "1, labelled with the name of the node this daemon runs on (its Kubernetes node, or the host name in local mode): node scores join on it",
            n.info.clone(),
        );
        r.register(
            "weight_writes",
            "Pod cgroup CPU weights written by the weight lever (Kubernetes mode), by result",
            m.weight_writes.clone(),
        );
        r.register(
            "weight_lowered_pods",
            "Pods whose pod cgroup CPU weight MBCAS holds lowered now (Kubernetes mode)",
            m.weight_lowered.clone(),
        );
        r.register(
            "state_restored_consumers",
            "Pods whose decision state this daemon took back from --state-file when its loop started",
            m.state_restored.clone(),
        );
        r.register(
            "state_save_failures",
            "Times the decision state could not be written to --state-file",
            m.state_save_failures.clone(),
        );
        r.register_with_unit(
            "loop_duration",
            "Duration of one decision pass (sample, demand, market, policy, actuation)",
            Unit::Seconds,
            m.loop_duration.clone(),
        );
        Self {
            registry: Arc::new(r),
            ..m
        }
    }

    /// Records one pod's demand estimate: smoothed demand and need, in millicores.
    pub fn set_pod_demand(&self, pod: &PodLabels, demand_millicores: f64, need: MilliCpu) {
        self.track(pod);
        self.pod_demand
            .get_or_create(pod)
            .set(demand_millicores / 1000.0);
        self.pod_need
            .get_or_create(pod)
            .set(millicores_to_cores(need));
    }

    /// Records the CPU limit a pod has now.
    pub fn set_pod_allocation(&self, pod: &PodLabels, limit: MilliCpu) {
        self.track(pod);
        self.pod_allocation
            .get_or_create(pod)
            .set(millicores_to_cores(limit));
    }

    /// Records the fraction of throttled periods in the pod's last window.
    pub fn set_pod_throttled_ratio(&self, pod: &PodLabels, ratio: f64) {
        self.track(pod);
        self.pod_throttled_ratio.get_or_create(pod).set(ratio);
    }

    /// Adds the run-queue wait of the pod's last window, in thread-seconds.
    pub fn add_pod_runqueue_wait(&self, pod: &PodLabels, seconds: f64) {
        self.track(pod);
        if seconds.is_finite() && seconds > 0.0 {
            self.pod_runqueue_wait.get_or_create(pod).inc_by(seconds);
        } else {
            let _ = self.pod_runqueue_wait.get_or_create(pod);
        }
    }

    /// Records the market's contention level (rule 0), 0 when not contended.
    pub fn set_contention_level(&self, level: f64) {
        self.contention_level.set(level);
    }

    /// Removes every series of a pod that is gone. Returns whether it had any.
    pub fn remove_pod(&self, pod: &PodLabels) -> bool {
        lock(&self.pods).remove(pod);
        let mut any = false;
        for family in [
            &self.pod_demand,
            &self.pod_need,
            &self.pod_allocation,
            &self.pod_throttled_ratio,
        ] {
            any |= family.remove(pod);
        }
        any |= self.pod_runqueue_wait.remove(pod);
        any
    }

    /// Keeps the series of the given pods and removes those of every other pod.
    pub fn retain_pods<'a>(&self, live: impl IntoIterator<Item = &'a PodLabels>) {
        let live: HashSet<&PodLabels> = live.into_iter().collect();
        let stale: Vec<PodLabels> = lock(&self.pods)
            .iter()
            .filter(|p| !live.contains(p))
            .cloned()
            .collect();
        for pod in &stale {
            self.remove_pod(pod);
        }
    }

    /// How many pods currently have series.
    pub fn pod_count(&self) -> usize {
        lock(&self.pods).len()
    }

    fn track(&self, pod: &PodLabels) {
        let mut pods = lock(&self.pods);
        if !pods.contains(pod) {
            pods.insert(pod.clone());
        }
    }

    /// Records the outcome of one market run.
    pub fn set_market(&self, price: f64, capacity: MilliCpu, overcommitted: bool) {
        self.clearing_price.set(price);
        self.capacity.set(millicores_to_cores(capacity));
        self.overcommitted.set(i64::from(overcommitted));
    }

    /// Counts one policy decision; `reason` is a [`crate::policy::Reason`] code.
    pub fn inc_decision(&self, reason: &'static str) {
        self.decisions.get_or_create(&ReasonLabels { reason }).inc();
    }

    /// Counts one resize by its result code (`applied`, `failed`, `conflict`, …).
    pub fn inc_resize(&self, result: &'static str) {
        self.resizes.get_or_create(&ResultLabels { result }).inc();
    }

    /// Records the time from a resize PATCH until the kubelet reported it applied.
    pub fn observe_resize_latency(&self, latency: Duration) {
        self.resize_latency.observe(latency.as_secs_f64());
    }

    /// Adds throttle events read from the ring buffer.
    pub fn add_ebpf_events(&self, n: u64) {
        self.ebpf_events.inc_by(n);
    }

    /// Adds lost events; `stage` is [`DROP_RINGBUF`] or [`DROP_CHANNEL`].
    pub fn add_ebpf_drops(&self, stage: &'static str, n: u64) {
        self.ebpf_drops
            .get_or_create(&StageLabels { stage })
            .inc_by(n);
    }

    /// Records the sensor's cumulative kernel counters; the counters advance by
    /// the difference to the previous call (a smaller value, after the sensor
    /// was restarted, counts from zero).
    pub fn observe_kernel_stats(&self, stats: &KernelStats) {
        let now = (stats.events, stats.ringbuf_drops, stats.user_drops);
        let prev = std::mem::replace(&mut *lock(&self.kernel_last), now);
        let delta = |n: u64, p: u64| if n >= p { n - p } else { n };
        self.add_ebpf_events(delta(now.0, prev.0));
        self.add_ebpf_drops(DROP_RINGBUF, delta(now.1, prev.1));
        self.add_ebpf_drops(DROP_CHANNEL, delta(now.2, prev.2));
    }

    /// Records each attached program's cumulative `bpf_stats`. Names other than
    /// the programs `mbcas-common` defines are counted under `other`, so the
    /// label stays bounded.
    pub fn observe_program_costs(&self, costs: &[ProgramCost]) {
        let mut other = (0, 0);
        for c in costs {
            match [PROG_PERIOD_TIMER, PROG_SCHED_SWITCH]
                .into_iter()
                .find(|&p| p == c.name)
            {
                Some(p) => self.set_ebpf_program_stats(p, c.run_time_ns, c.run_count),
                None => {
                    other.0 += c.run_time_ns;
                    other.1 += c.run_count;
                }
            }
        }
        if other != (0, 0) {
            self.set_ebpf_program_stats("other", other.0, other.1);
        }
    }

    /// Records a program's cumulative `bpf_stats` (run time in ns, run count) as
    /// read from the kernel. Counters advance by the difference to the last
    /// reading; a reading below the last one (program reloaded) starts over.
    pub fn set_ebpf_program_stats(&self, program: &'static str, run_time_ns: u64, runs: u64) {
        let (d_time, d_runs) = {
            let mut last = lock(&self.ebpf_last);
            let prev = last.insert(program, (run_time_ns, runs));
            match prev {
                Some((t, n)) if run_time_ns >= t && runs >= n => (run_time_ns - t, runs - n),
                _ => (run_time_ns, runs),
            }
        };
        let labels = ProgramLabels { program };
        self.ebpf_run_time
            .get_or_create(&labels)
            .inc_by(d_time as f64 / 1e9);
        self.ebpf_runs.get_or_create(&labels).inc_by(d_runs);
    }

    /// Marks `mode` (e.g. `ebpf`, `poll`) as the sensor mode in use: its series is
    /// 1, every mode set before is 0.
    pub fn set_sensor_mode(&self, mode: &'static str) {
        let mut modes = lock(&self.modes);
        for old in modes.iter().copied().filter(|&m| m != mode) {
            self.sensor_mode
                .get_or_create(&ModeLabels { mode: old })
                .set(0);
        }
        modes.insert(mode);
        self.sensor_mode.get_or_create(&ModeLabels { mode }).set(1);
    }

    /// How many pods' decision state was taken back at the loop's start.
    pub fn set_state_restored(&self, n: usize) {
        self.state_restored
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Counts a failed save of the decision state.
    pub fn inc_state_save_failures(&self) {
        self.state_save_failures.inc();
    }

    /// Whether this daemon holds its node's lease.
    pub fn set_node_lease_held(&self, held: bool) {
        self.node_lease_held.set(i64::from(held));
    }

    /// Records the node's pressure in the last round.
    pub fn set_node_pressure(&self, p: &NodePressure) {
        let n = &self.node;
        n.demand.set(p.demand_m / 1000.0);
        n.usage.set(p.usage_m / 1000.0);
        n.wait.set(p.wait_m / 1000.0);
        let capacity = p.capacity.get() as f64;
        n.unmet.set((p.demand_m - capacity).max(0.0) / 1000.0);
        n.pressure.set(p.demand_m / capacity.max(1.0));
    }

    /// Adds the node's CPU pressure stall time since the last reading.
    pub fn add_node_cpu_pressure(&self, seconds: f64) {
        if seconds > 0.0 {
            self.node.psi.inc_by(seconds);
        }
    }

    /// Names the node this daemon runs on (`mbcas_node_info{node}`).
    pub fn set_node_name(&self, node: &str) {
        self.node.info.clear();
        self.node
            .info
            .get_or_create(&NodeLabels {
                node: node.to_owned(),
            })
            .set(1);
    }

    /// The node's CPUs.
    pub fn set_node_cpus(&self, cpus: usize) {
        self.node.cpus.set(i64::try_from(cpus).unwrap_or(i64::MAX));
    }

    /// Adds the node's busy CPU time since the last reading.
    pub fn add_node_cpu_busy(&self, seconds: f64) {
        if seconds > 0.0 {
            self.node.busy.inc_by(seconds);
        }
    }

    /// The share of the node's memory in use.
    pub fn set_node_memory_usage(&self, ratio: f64) {
        self.node.memory_usage.set(ratio);
    }

    /// Adds the node's memory pressure stall time since the last reading.
    pub fn add_node_memory_pressure(&self, seconds: f64) {
        if seconds > 0.0 {
            self.node.memory_psi.inc_by(seconds);
        }
    }

    /// Creates the weight lever's series at zero (they exist from the start,
    /// so rates and dashboards have them before the first write).
    pub fn init_weight_writes(&self) {
        for result in ["lowered", "restored", "relowered", "failed"] {
            let _ = self.weight_writes.get_or_create(&ResultLabels { result });
        }
        self.weight_lowered.set(0);
    }

    /// Counts a pod cgroup weight written by the weight lever.
    pub fn inc_weight_write(&self, result: &'static str) {
        self.weight_writes
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    /// How many pods' weights the weight lever holds lowered now.
    pub fn set_weight_lowered_pods(&self, n: usize) {
        self.weight_lowered
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Starts timing one decision pass; the duration is recorded when the
    /// returned guard is dropped (also on early return or error).
    pub fn loop_timer(&self) -> LoopTimer {
        LoopTimer {
            histogram: self.loop_duration.clone(),
            start: Instant::now(),
        }
    }

    /// Encodes every metric as OpenMetrics text (ending in `# EOF`).
    pub fn encode(&self) -> Result<String, MetricsError> {
        let mut out = String::with_capacity(4096);
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .map_err(|_| MetricsError::Encode)?;
        Ok(out)
    }
}

/// Records a decision pass's duration into `mbcas_loop_duration_seconds` when
/// dropped.
#[must_use = "the duration is recorded when the timer is dropped"]
pub struct LoopTimer {
    histogram: Histogram,
    start: Instant,
}

impl Drop for LoopTimer {
    fn drop(&mut self) {
        self.histogram.observe(self.start.elapsed().as_secs_f64());
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MetricsError {
    #[error("failed to encode the metrics registry as OpenMetrics text")]
    Encode,
}

#[cfg(test)]
pub(crate) mod openmetrics;

#[cfg(test)]
mod tests;
