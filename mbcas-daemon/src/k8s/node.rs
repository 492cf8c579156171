//! Kubernetes mode as a [`Mode`] of the shared [`crate::decision::DecisionLoop`]:
//! this node's pods are the consumers, PodAllocations the actuator.
//!
//! Each round reads the node's allocatable CPU (Node object) and the managed
//! pods (Running, not excluded; see [`PodFacts::exclusion`]) joined to their pod
//! cgroups and their containers' cgroups (the loop adds a container's
//! throttling to its pod's and splits a new limit by the containers' measured
//! needs), and publishes the decisions that change a limit. Capacity is
//! allocatable less what the unmanaged pods use, measured from their cgroups
//! (see [`super::unmanaged`]); their weight is then not in the market's total
//! either, so the entitlements share the same capacity among the same pods. A
//! pod whose cgroup cannot be found or read this round is left out of the
//! market (its limit stays) and counted. While the API server is unreachable
//! nothing is written and the limits stay as they are; the next successful
//! round catches up.

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    time::Duration,
};

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::runtime::reflector::Store;
use tokio::time::Instant;

use super::{
    crd::PodAllocation,
    early::CgroupBook,
    pods::{PodFacts, node_allocatable},
    publish::{PublishError, Why, Writer, allocation_split},
    unmanaged::UseMeter,
    weight::WeightLever,
};
use crate::{
    cgroup::{CgroupDir, Mounts, files, index::CgroupIndex},
    config::DecisionConfig,
    decision::{Census, Consumer, Mode, Part, Unreadable},
    engine::{NodeInput, StepOutcome},
    error::error_chain,
    metrics::PodLabels,
    policy,
    units::{MilliCpu, PodKey},
};

/// How often the cgroup tree is walked again when a pod's cgroup is unknown.
const RESCAN_EVERY: Duration = Duration::from_secs(5);

/// How long an unmanaged pod whose cgroup cannot be found or read counts for
/// nothing before it counts at its limit: longer than [`RESCAN_EVERY`], so a
/// new pod's cgroup is found first.
const UNREAD_GRACE: Duration = Duration::from_secs(15);

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

/// What one round did (logged at debug).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct RoundSummary {
    pub managed: usize,
    pub without_cgroup: usize,
    pub written: usize,
    pub write_errors: usize,
    pub deleted: usize,
}

/// This node's pods as the consumers of the decision loop.
pub struct NodePods {
    cfg: NodeLoopConfig,
    index: CgroupIndex,
    mounts: Mounts,
    last_rescan: Option<Instant>,
    pods: Store<Pod>,
    nodes: Store<Node>,
    writer: Writer,
    /// This round's managed pods and their weights, by key.
    round: HashMap<PodKey, (PodFacts, f64)>,
    summary: RoundSummary,
    /// The quota each pod's cgroup had at the last round (millicores), by pod
    /// cgroup id: with the one read now, what the kernel enforced in between.
    last_quota: HashMap<u64, MilliCpu>,
    /// Each pod's cgroup (managed or not), by pod UID, resolved once (resolving is path
    /// lookups in the cgroup filesystems: a quarter of the daemon's CPU on a
    /// 110-pod node when it was done every round). Dropped when its counters
    /// cannot be read or the pod is no longer on the node.
    dirs: HashMap<PodKey, CgroupDir>,
    /// Each managed pod's container cgroups, with the container ids they were
    /// resolved for: resolved again when a container is replaced.
    parts: HashMap<PodKey, (Vec<Option<String>>, Vec<Part>)>,
    /// Each unmanaged pod's measured use.
    unmanaged: HashMap<PodKey, UseMeter>,
    /// Since when each running unmanaged pod's cgroup could not be read.
    unread: HashMap<PodKey, Duration>,
    /// The managed pods' cgroups, shared with the controller's early quota
    /// writes.
    cgroups: CgroupBook,
    /// The weight lever (`--weight-lever`); `None`: the quota lever.
    weights: Option<WeightLever>,
    start: Instant,
}

impl NodePods {
    pub fn new(cfg: NodeLoopConfig, pods: Store<Pod>, nodes: Store<Node>, writer: Writer) -> Self {
        Self {
            index: CgroupIndex::new(cfg.cgroup_root.clone()),
            cfg,
            mounts: Mounts::read(),
            last_rescan: None,
            pods,
            nodes,
            writer,
            round: HashMap::new(),
            summary: RoundSummary::default(),
            last_quota: HashMap::new(),
            dirs: HashMap::new(),
            parts: HashMap::new(),
            unmanaged: HashMap::new(),
            unread: HashMap::new(),
            cgroups: CgroupBook::default(),
            weights: None,
            start: Instant::now(),
        }
    }

    /// Keeps the managed pods' cgroups in `book` as this loop resolves them,
    /// for the controller's early quota writes.
    #[must_use]
    pub fn with_cgroup_book(mut self, book: CgroupBook) -> Self {
        if let Some(w) = &mut self.weights {
            w.set_book(book.clone());
        }
        self.cgroups = book;
        self
    }

    /// Holds a pod to its share by lowering its pod cgroup's weight, not its
    /// limit (the engine must run [`crate::market::Lever::Weight`]); see
    /// [`super::weight`].
    #[must_use]
    pub fn with_weight_lever(mut self, metrics: Option<crate::metrics::Metrics>) -> Self {
        let mut lever = WeightLever::new(metrics);
        lever.set_book(self.cgroups.clone());
        self.weights = Some(lever);
        self
    }

    /// Walks the cgroup tree again unless it was walked in the last
    /// [`RESCAN_EVERY`]; whether it did.
    fn rescan_if_stale(&mut self) -> bool {
        let stale = self.last_rescan.is_none_or(|t| t.elapsed() >= RESCAN_EVERY);
        if stale {
            self.index.rescan();
            self.last_rescan = Some(Instant::now());
        }
        stale
    }

    /// The container cgroups of `pod` (those found): remembered while its
    /// containers' ids stay the same, or resolved now. Containers missing
    /// from the tree are looked for again at the next rescan.
    fn pod_parts(&mut self, key: &PodKey, pod: &PodFacts) -> Vec<Part> {
        let ids: Vec<Option<String>> = pod
            .containers
            .iter()
            .map(|c| c.container_id.clone())
            .collect();
        if let Some((known, parts)) = self.parts.get(key)
            && *known == ids
            && (parts.len() == ids.len()
                || self.last_rescan.is_some_and(|t| t.elapsed() < RESCAN_EVERY))
        {
            return parts.clone();
        }
        let find = |index: &CgroupIndex| -> Vec<(String, PathBuf)> {
            let cgroups = index.pods();
            pod.containers
                .iter()
                .filter_map(|c| {
                    let id = c.container_id.as_deref()?;
                    cgroups
                        .iter()
                        .find(|(_, pc)| {
                            pc.pod_uid == pod.uid
                                && pc.container.as_ref().is_some_and(|r| r.id == id)
                        })
                        .and_then(|(cg, _)| index.path(*cg))
                        .map(|p| (c.name.clone(), p.to_path_buf()))
                })
                .collect()
        };
        let mut found = find(&self.index);
        if found.len() < ids.len() && self.rescan_if_stale() {
            found = find(&self.index);
        }
        let parts: Vec<Part> = found
            .into_iter()
            .filter_map(|(name, path)| {
                CgroupDir::open_with_mounts(&path, &self.mounts)
                    .ok()
                    .map(|dir| Part {
                        name,
                        dir,
                        need: None,
                    })
            })
            .collect();
        self.parts.insert(key.clone(), (ids, parts.clone()));
        parts
    }

    /// What the unmanaged pods use between them, millicores: each at its
    /// measured use (nothing in the round it is first seen), or at its limit
    /// (request) while its cgroup cannot be read.
    fn unmanaged_use(&mut self, pods: &[PodFacts]) -> MilliCpu {
        let at = self.start.elapsed();
        let mut total = 0.0;
        for facts in pods {
            let key = PodKey::from(facts.uid.as_str());
            let usage = self
                .pod_dir(&key, facts)
                .and_then(|d| d.read_usage().ok().flatten());
            total += match usage {
                // Seen for the first time: nothing for this one round. Its
                // limit would shrink the capacity for a round (a new 1330 m
                // Guaranteed pod on the test node did, and the contention rule
                // capped a managed pod to its floor on it), while the kernel
                // gives the new pod its share whatever the managed limits.
                Some(ns) => {
                    self.unread.remove(&key);
                    self.unmanaged
                        .entry(key.clone())
                        .or_default()
                        .observe(at, ns)
                        .unwrap_or(0.0)
                }
                // Not found or not readable: nothing for a grace period (a
                // pod just Running whose cgroup the index has not seen yet
                // counted at its limit; the test node's 1330 m holder shrank
                // the capacity to 200 m and a managed pod was capped to its
                // floor), then its limit (its request without one).
                None => {
                    self.dirs.remove(&key);
                    self.unmanaged.remove(&key);
                    let since = *self.unread.entry(key.clone()).or_insert(at);
                    if at.saturating_sub(since) < UNREAD_GRACE {
                        0.0
                    } else {
                        facts.limit().unwrap_or_else(|| facts.request()).get() as f64
                    }
                }
            };
        }
        MilliCpu(total.ceil().min(u64::MAX as f64) as u64)
    }

    /// The pod cgroup of `pod`: remembered, or resolved now.
    fn pod_dir(&mut self, key: &PodKey, pod: &PodFacts) -> Option<CgroupDir> {
        if let Some(d) = self.dirs.get(key) {
            return Some(d.clone());
        }
        let dir = self.resolve_pod_dir(pod)?;
        self.dirs.insert(key.clone(), dir.clone());
        Some(dir)
    }

    /// The pod cgroup of `pod`, from the fixture or the cgroup index.
    fn resolve_pod_dir(&mut self, pod: &PodFacts) -> Option<CgroupDir> {
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
            None if self.rescan_if_stale() => find(&self.index),
            None => None,
        }?;
        CgroupDir::open_with_mounts(&path, &self.mounts).ok()
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

    /// This node's running pods: the managed ones and the unmanaged ones.
    fn node_pods(&self) -> (Vec<PodFacts>, Vec<PodFacts>) {
        let excluded = &self.cfg.decision.excluded_namespaces;
        let mut unmanaged = Vec::new();
        let mut managed = Vec::new();
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
                unmanaged.push(facts);
            } else {
                managed.push(facts);
            }
        }
        (managed, unmanaged)
    }
}

impl Mode for NodePods {
    type Error = std::convert::Infallible;

    fn census(&mut self) -> Option<Census> {
        self.summary = RoundSummary::default();
        self.round.clear();
        let allocatable = self.nodes.state().first().and_then(|n| node_allocatable(n));
        let Some(allocatable) = allocatable else {
            tracing::warn!(node = %self.cfg.node, "node object or its allocatable CPU not known yet; no decisions this round");
            return None;
        };
        let (managed, unmanaged) = self.node_pods();
        let live: std::collections::HashSet<PodKey> = managed
            .iter()
            .chain(&unmanaged)
            .map(|f| PodKey::from(f.uid.as_str()))
            .collect();
        self.dirs.retain(|k, _| live.contains(k));
        self.parts.retain(|k, _| live.contains(k));
        let managed_uids: std::collections::HashSet<&str> =
            managed.iter().map(|f| f.uid.as_str()).collect();
        self.cgroups.retain(|uid| managed_uids.contains(uid));
        if let Some(w) = &mut self.weights {
            w.retain(|k| managed_uids.contains(k.as_str()));
        }
        self.unmanaged.retain(|k, _| live.contains(k));
        self.unread.retain(|k, _| live.contains(k));
        let capacity = policy::node_capacity(allocatable, self.unmanaged_use(&unmanaged));
        let mut consumers = Vec::with_capacity(managed.len());
        let mut live_quota: HashMap<u64, MilliCpu> = HashMap::new();
        for facts in managed {
            let Some(current) = facts.current_limit() else {
                continue;
            };
            let key = PodKey::from(facts.uid.as_str());
            let Some(dir) = self.pod_dir(&key, &facts) else {
                self.summary.without_cgroup += 1;
                tracing::debug!(pod = %format!("{}/{}", facts.namespace, facts.name), "no cgroup found for pod; left out this round");
                continue;
            };
            let original = self
                .writer
                .stored(&facts.namespace, &facts.name)
                .and_then(|pa| original_total(&pa, &facts.uid))
                .unwrap_or(current);
            let floor = facts.request().max(self.cfg.decision.market.min_limit);
            let weight = facts.weight(self.cfg.priority_weighting);
            consumers.push(Consumer {
                key: key.clone(),
                labels: PodLabels::new(facts.namespace.clone(), facts.name.clone()),
                current,
                original,
                weight,
                floor,
                cap: self
                    .cfg
                    .decision
                    .market
                    .cap(original, floor, capacity.max(floor)),
                window_limit: self.window_limit(&dir, &mut live_quota),
                demoted: self
                    .weights
                    .as_mut()
                    .is_some_and(|w| w.lowered(&key, &dir, facts.request())),
                parts: self.pod_parts(&key, &facts),
                dir,
            });
            if let Some(c) = consumers.last() {
                self.cgroups.record(
                    &facts.uid,
                    &c.dir,
                    c.parts.iter().map(|p| (p.name.as_str(), &p.dir)),
                );
            }
            self.round.insert(key, (facts, weight));
        }
        self.last_quota = live_quota;
        // The unmanaged pods' use is out of the capacity: their weight is out
        // of the total too.
        Some(Census {
            node: NodeInput::new(capacity),
            consumers,
        })
    }

    fn unreadable(&mut self, consumer: &Consumer, why: &Unreadable) {
        self.summary.without_cgroup += 1;
        self.round.remove(&consumer.key);
        // Resolve it again next round: the pod's cgroup may have been recreated.
        self.dirs.remove(&consumer.key);
        self.parts.remove(&consumer.key);
        let error = match why {
            Unreadable::Failed(e) => error_chain(e),
            Unreadable::NoUsage => "no CPU usage counter".to_owned(),
        };
        let pod = format!("{}/{}", consumer.labels.namespace, consumer.labels.pod);
        tracing::debug!(%pod, %error, "cgroup unreadable; left out this round");
    }

    async fn actuate(
        &mut self,
        _now: std::time::Duration,
        consumers: &[Consumer],
        outcome: &StepOutcome,
    ) -> Result<(), Self::Error> {
        self.summary.managed = outcome.rows.len();
        for (row, consumer) in outcome.rows.iter().zip(consumers) {
            // Publish only when the decision changes the pod's limit: an
            // allocation whose resize is still in flight (spec not yet patched)
            // must not be taken back by a round that merely holds.
            if !row.changed() {
                continue;
            }
            let Some((facts, weight)) = self.round.get(&row.key) else {
                continue;
            };
            let stored = self.writer.stored(&facts.namespace, &facts.name);
            let needs: BTreeMap<String, MilliCpu> = consumer
                .parts
                .iter()
                .filter_map(|p| p.need.map(|n| (p.name.clone(), n)))
                .collect();
            let pa = allocation_split(
                facts,
                stored.as_deref(),
                &self.cfg.node,
                row.to,
                &Why {
                    demand: row.need,
                    weight: *weight,
                    price: outcome.price,
                    reason: row.reason.as_str(),
                },
                &needs,
            );
            match self.writer.publish(&pa).await {
                Ok(true) => {
                    self.summary.written += 1;
                    tracing::info!(pod = %format!("{}/{}", facts.namespace, facts.name), from = %row.from, to = %row.to, need = %row.need, reason = row.reason.as_str(), "allocation published");
                }
                Ok(false) => {}
                Err(e) => {
                    self.summary.write_errors += 1;
                    log_publish_error(&e);
                }
            }
        }
        if let Some(w) = &mut self.weights {
            for (row, consumer) in outcome.rows.iter().zip(consumers) {
                w.apply(&row.key, &consumer.dir, row.contended.is_some());
            }
            w.export();
        }
        // The loop starts once the pod and allocation stores are synced, so a
        // pod missing from the store is really gone.
        match self.writer.collect_garbage(&self.pods).await {
            Ok(n) => self.summary.deleted = n,
            Err(e) => log_publish_error(&e),
        }
        tracing::debug!(summary = ?self.summary, "round");
        Ok(())
    }

    fn finish(&mut self) {
        if let Some(w) = &mut self.weights {
            w.release_all();
        }
    }
}

/// The pod's original total limit as the controller recorded it.
fn original_total(pa: &PodAllocation, uid: &str) -> Option<MilliCpu> {
    if pa.spec.pod_uid != uid {
        return None;
    }
    let original = pa.originals();
    if original.is_empty() {
        return None;
    }
    original
        .iter()
        .map(|o| o.cpu_limit.map(|q| q.millis().get()))
        .sum::<Option<u64>>()
        .map(MilliCpu)
}

fn log_publish_error(e: &PublishError) {
    tracing::warn!(error = %error_chain(e), "cannot write PodAllocations now; limits stay as they are");
}

/// Reads `--test-pod-cgroups FILE`: a JSON object `{"namespace/name": "/sys/fs/cgroup/…"}`.
pub fn read_pod_cgroups(path: &std::path::Path) -> Result<BTreeMap<String, PathBuf>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}
