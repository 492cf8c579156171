//! The decision loop of Kubernetes mode: this node's pods → cgroup counters →
//! [`Engine`] (demand → market → policy) → PodAllocations.
//!
//! Each round reads the node's allocatable CPU (Node object), the managed pods
//! (Running, not excluded; see [`PodFacts::exclusion`]), their pod cgroup's
//! counters through the sensor, and publishes the decisions that change a
//! limit. Capacity is allocatable − reserve − what unmanaged pods may use
//! (their limits, or their requests when they have none). A pod whose cgroup
//! cannot be found or read this round is left out of the market (its limit
//! stays) and counted. While the API server is unreachable nothing is written
//! and the limits stay as they are; the next successful round catches up.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    path::PathBuf,
    time::Duration,
};

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::runtime::reflector::Store;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{
    crd::PodAllocation,
    pods::{PodFacts, node_allocatable},
    publish::{PublishError, Why, Writer, allocation_for},
};
use crate::{
    cgroup::{CgroupDir, Hierarchy, Mounts, files, index::CgroupIndex},
    config::DecisionConfig,
    demand::Counters,
    engine::{ConsumerInput, Engine, EngineConfig, EngineError, NodeInput, StepOutcome},
    metrics::{Metrics, PodLabels},
    policy,
    sensor::{Sensor, SensorError, ThrottleEvent},
    units::{MilliCpu, PodKey},
};

/// How often the cgroup tree is walked again when a pod's cgroup is unknown.
const RESCAN_EVERY: Duration = Duration::from_secs(5);

#[derive(Clone, Debug)]
pub struct NodeLoopConfig {
    pub node: String,
    pub decision: DecisionConfig,
    /// Multiply weights by `1 + priority/1e9` (off by default).
    pub priority_weighting: bool,
    /// Root of the cgroup hierarchy with the `cpu` controller.
    pub cgroup_root: PathBuf,
    /// Test fixture: `namespace/name` → a cgroup directory standing in for the
    /// pod's cgroup (pods in a control-plane-only test environment have none).
    pub pod_cgroups: BTreeMap<String, PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum NodeLoopError {
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// What one round did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct RoundSummary {
    pub managed: usize,
    pub without_cgroup: usize,
    pub written: usize,
    pub write_errors: usize,
    pub deleted: usize,
    pub skipped_no_node: bool,
}

pub struct NodeLoop {
    cfg: NodeLoopConfig,
    engine: Engine,
    sensor: Sensor,
    index: CgroupIndex,
    mounts: Mounts,
    last_rescan: Option<Instant>,
    pods: Store<Pod>,
    nodes: Store<Node>,
    writer: Writer,
    metrics: Metrics,
    start: Instant,
    /// Pod cgroup ids known throttled in the last round (events for them do not wake the loop).
    throttled: HashSet<u64>,
    /// Pod cgroup ids of managed pods.
    managed_ids: HashSet<u64>,
    /// The quota each pod's cgroup had at the last round (millicores), by pod
    /// cgroup id: with the one read now, what the kernel enforced in between.
    last_quota: HashMap<u64, MilliCpu>,
    live_labels: HashMap<String, PodLabels>,
}

impl NodeLoop {
    pub fn new(
        cfg: NodeLoopConfig,
        sensor: Sensor,
        pods: Store<Pod>,
        nodes: Store<Node>,
        writer: Writer,
        metrics: Metrics,
    ) -> Self {
        let engine = Engine::new(EngineConfig {
            demand: cfg.decision.demand,
            policy: cfg.decision.policy,
            overcommit: cfg.decision.market.overcommit,
            reserve: cfg.decision.market.node_reserve,
        });
        Self {
            index: CgroupIndex::new(cfg.cgroup_root.clone()),
            cfg,
            engine,
            sensor,
            mounts: Mounts::read(),
            last_rescan: None,
            pods,
            nodes,
            writer,
            metrics,
            start: Instant::now(),
            throttled: HashSet::new(),
            last_quota: HashMap::new(),
            managed_ids: HashSet::new(),
            live_labels: HashMap::new(),
        }
    }

    /// The pod cgroup of `pod`, from the fixture or the cgroup index.
    fn pod_dir(&mut self, pod: &PodFacts) -> Option<CgroupDir> {
        let key = format!("{}/{}", pod.namespace, pod.name);
        if let Some(p) = self.cfg.pod_cgroups.get(&key) {
            return CgroupDir::open_with_mounts(p, &self.mounts).ok();
        }
        let find = |index: &CgroupIndex| {
            index
                .pods()
                .into_iter()
                .find(|(_, pc)| pc.pod_uid == pod.uid && pc.container.is_none())
                .and_then(|(id, _)| index.path(id).map(PathBuf::from))
        };
        let path = match find(&self.index) {
            Some(p) => Some(p),
            None => {
                let stale = self.last_rescan.is_none_or(|t| t.elapsed() >= RESCAN_EVERY);
                if stale {
                    self.index.rescan();
                    self.last_rescan = Some(Instant::now());
                    find(&self.index)
                } else {
                    None
                }
            }
        }?;
        CgroupDir::open_with_mounts(&path, &self.mounts).ok()
    }

    fn read(&self, dir: &CgroupDir, at_ns: u64) -> Result<Option<Counters>, SensorError> {
        let c = self.sensor.read(dir)?;
        let psi = if dir.hierarchy == Hierarchy::V2 {
            files::read_pressure_some_ns(&dir.path)?
        } else {
            None
        };
        Ok(c.usage_ns.map(|usage_ns| Counters {
            at_ns,
            usage_ns,
            throttled_ns: c.throttled_ns,
            nr_periods: c.nr_periods,
            nr_throttled: c.nr_throttled,
            psi_some_ns: psi,
        }))
    }

    /// The lowest quota the pod's cgroup had at the last round and now (the
    /// kubelet applies a resize about a second after the spec changes); `None`
    /// when unlimited or unreadable. Records the quota read now in `live`.
    fn window_limit(&self, dir: &CgroupDir, live: &mut HashMap<u64, MilliCpu>) -> Option<MilliCpu> {
        let now = files::read_quota(&dir.path, dir.hierarchy)
            .ok()
            .and_then(|q| q.millicores())?;
        live.insert(dir.id.0, now);
        Some(
            self.last_quota
                .get(&dir.id.0)
                .map_or(now, |before| (*before).min(now)),
        )
    }

    /// One round: read, decide, publish.
    pub async fn round(&mut self) -> Result<(RoundSummary, Option<StepOutcome>), NodeLoopError> {
        let timer = self.metrics.loop_timer();
        let mut summary = RoundSummary::default();
        let allocatable = self.nodes.state().first().and_then(|n| node_allocatable(n));
        let Some(allocatable) = allocatable else {
            tracing::warn!(node = %self.cfg.node, "node object or its allocatable CPU not known yet; no decisions this round");
            summary.skipped_no_node = true;
            return Ok((summary, None));
        };
        let now = self.start.elapsed();
        let at_ns = u64::try_from(now.as_nanos()).unwrap_or(u64::MAX);
        let excluded = &self.cfg.decision.excluded_namespaces;
        let mut unmanaged = MilliCpu::ZERO;
        let mut unmanaged_weight = 0.0;
        let mut managed: Vec<PodFacts> = Vec::new();
        for pod in self.pods.state() {
            let facts = match PodFacts::from_pod(&pod) {
                Ok(f) => f,
                Err(e) => {
                    tracing::warn!(error = %e, "pod left alone");
                    continue;
                }
            };
            if !facts.running || facts.node.as_deref() != Some(self.cfg.node.as_str()) {
                continue;
            }
            if facts.exclusion(excluded).is_some() {
                unmanaged = MilliCpu(
                    unmanaged.get() + facts.limit().unwrap_or_else(|| facts.request()).get(),
                );
                unmanaged_weight += facts.weight(self.cfg.priority_weighting);
                continue;
            }
            managed.push(facts);
        }
        let capacity = policy::node_capacity(allocatable, unmanaged);
        let mut inputs = Vec::with_capacity(managed.len());
        let mut live_quota: HashMap<u64, MilliCpu> = HashMap::new();
        let mut by_key: HashMap<PodKey, (PodFacts, u64, f64)> = HashMap::new();
        for facts in managed {
            let Some(dir) = self.pod_dir(&facts) else {
                summary.without_cgroup += 1;
                tracing::debug!(pod = %format!("{}/{}", facts.namespace, facts.name), "no cgroup found for pod; left out this round");
                continue;
            };
            let counters = match self.read(&dir, at_ns) {
                Ok(Some(c)) => c,
                Ok(None) => {
                    summary.without_cgroup += 1;
                    continue;
                }
                Err(e) => {
                    tracing::debug!(pod = %facts.name, error = %crate::error::error_chain(&e), "cgroup unreadable; left out this round");
                    summary.without_cgroup += 1;
                    continue;
                }
            };
            let Some(current) = facts.limit() else {
                continue;
            };
            let original = self
                .writer
                .stored(&facts.namespace, &facts.name)
                .and_then(|pa| original_total(&pa, &facts.uid))
                .unwrap_or(current);
            let floor = facts.request().max(self.cfg.decision.market.min_limit);
            let weight = facts.weight(self.cfg.priority_weighting);
            let key = PodKey::from(facts.uid.as_str());
            inputs.push(ConsumerInput {
                key: key.clone(),
                counters,
                current,
                original,
                weight,
                floor,
                cap: self
                    .cfg
                    .decision
                    .market
                    .cap(original, floor, capacity.max(floor)),
                exclusion: None,
                window_limit: self.window_limit(&dir, &mut live_quota),
            });
            by_key.insert(key, (facts, dir.id.0, weight));
        }
        summary.managed = inputs.len();
        self.last_quota = live_quota;
        let node = NodeInput {
            capacity,
            other_weight: unmanaged_weight,
        };
        let outcome = self.engine.step(now, &node, &inputs)?;
        self.metrics
            .set_market(outcome.price, outcome.capacity, outcome.overcommitted);
        let threshold = self.cfg.decision.policy.throttled_threshold;
        self.throttled.clear();
        self.managed_ids = by_key.values().map(|(_, id, _)| *id).collect();
        let mut live = HashMap::new();
        for row in &outcome.rows {
            let Some((facts, cg, weight)) = by_key.get(&row.key) else {
                continue;
            };
            let labels = PodLabels::new(facts.namespace.clone(), facts.name.clone());
            if let Some(e) = row.estimate {
                self.metrics.set_pod_demand(&labels, e.smoothed, row.need);
                self.metrics
                    .set_pod_throttled_ratio(&labels, e.throttled_ratio);
                if e.throttled_ratio > threshold {
                    self.throttled.insert(*cg);
                }
            }
            self.metrics.set_pod_allocation(&labels, row.to);
            self.metrics.inc_decision(row.reason.as_str());
            live.insert(row.key.to_string(), labels);
            // Publish only when the decision changes the pod's limit: an
            // allocation whose resize is still in flight (spec not yet patched)
            // must not be taken back by a round that merely holds.
            if !row.changed() {
                continue;
            }
            let pa = allocation_for(
                facts,
                &self.cfg.node,
                row.to,
                &Why {
                    demand: row.need,
                    weight: *weight,
                    price: outcome.price,
                    reason: row.reason.as_str(),
                },
            );
            match self.writer.publish(&pa).await {
                Ok(true) => {
                    summary.written += 1;
                    tracing::info!(pod = %format!("{}/{}", facts.namespace, facts.name), from = %row.from, to = %row.to, need = %row.need, reason = row.reason.as_str(), "allocation published");
                }
                Ok(false) => {}
                Err(e) => {
                    summary.write_errors += 1;
                    log_publish_error(&e);
                }
            }
        }
        self.metrics.retain_pods(live.values());
        self.live_labels = live;
        // The loop starts once the pod and allocation stores are synced, so a
        // pod missing from the store is really gone.
        match self.writer.collect_garbage(&self.pods).await {
            Ok(n) => summary.deleted = n,
            Err(e) => log_publish_error(&e),
        }
        drop(timer);
        Ok((summary, Some(outcome)))
    }

    /// Whether `ev` marks the onset of throttling of a managed pod (its
    /// pod cgroup, or a container cgroup inside it).
    fn is_onset(&self, ev: &ThrottleEvent) -> bool {
        ev.kind == mbcas_common::EVENT_PERIOD_THROTTLED
            && !self.throttled.contains(&ev.cgroup_id)
            && (self.managed_ids.contains(&ev.cgroup_id)
                || self
                    .index
                    .path(crate::units::CgroupId(ev.cgroup_id))
                    .is_some_and(|p| {
                        p.parent()
                            .and_then(|parent| self.index.id(parent))
                            .is_some_and(|pid| self.managed_ids.contains(&pid.0))
                    }))
    }

    /// Runs rounds every `tick`, and sooner (after `debounce`) when throttling starts.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut events = self.sensor.take_events();
        let tick = self.cfg.decision.tick;
        let debounce = self.cfg.decision.debounce;
        let mut next = Instant::now();
        loop {
            match self.round().await {
                Ok((s, _)) => tracing::debug!(?s, "round"),
                Err(e) => tracing::warn!(error = %crate::error::error_chain(&e), "round failed"),
            }
            self.export_sensor_stats();
            next += tick;
            if next < Instant::now() {
                next = Instant::now() + tick;
            }
            let woke = tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep_until(next) => false,
                w = self.next_onset(&mut events) => w,
            };
            if woke {
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(debounce) => {}
                }
                if let Some(rx) = events.as_mut() {
                    let mut n = 0;
                    while rx.try_recv().is_ok() {
                        n += 1;
                    }
                    self.metrics.add_ebpf_events(n);
                }
            }
        }
        tracing::info!("decision loop stopped");
    }

    fn export_sensor_stats(&self) {
        if let Some(stats) = self.sensor.kernel_stats() {
            self.metrics.observe_kernel_stats(&stats);
        }
        self.metrics
            .observe_program_costs(&self.sensor.program_costs());
    }

    async fn next_onset(
        &self,
        events: &mut Option<tokio::sync::mpsc::Receiver<ThrottleEvent>>,
    ) -> bool {
        loop {
            let ev = match events.as_mut() {
                Some(rx) => rx.recv().await,
                None => std::future::pending().await,
            };
            let Some(ev) = ev else {
                *events = None;
                continue;
            };
            self.metrics.add_ebpf_events(1);
            if self.is_onset(&ev) {
                return true;
            }
        }
    }
}

/// The pod's original total limit as the controller recorded it.
fn original_total(pa: &PodAllocation, uid: &str) -> Option<MilliCpu> {
    if pa.spec.pod_uid != uid {
        return None;
    }
    let st = pa.status.as_ref()?;
    if st.original.is_empty() {
        return None;
    }
    st.original
        .iter()
        .map(|o| o.cpu_limit.map(|q| q.millis().get()))
        .sum::<Option<u64>>()
        .map(MilliCpu)
}

fn log_publish_error(e: &PublishError) {
    tracing::warn!(error = %crate::error::error_chain(e), "cannot write PodAllocations now; limits stay as they are");
}

/// Reads `--test-pod-cgroups FILE`: a JSON object `{"namespace/name": "/sys/fs/cgroup/…"}`.
pub fn read_pod_cgroups(path: &std::path::Path) -> Result<BTreeMap<String, PathBuf>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}
