//! This node's pods: what MBCAS needs from each pod's spec and status, and the
//! reflector that keeps them (`spec.nodeName=<node>` only, fields pruned).
//!
//! [`PodFacts::from_pod`] is pure and total: a pod with an unreadable quantity
//! is reported as an error naming the field, never a panic, and the daemon
//! leaves that pod alone.

use std::{collections::BTreeSet, sync::Arc};

use futures::{Stream, StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::core::v1::{Container, Node, Pod};
use kube::{
    Api, Client, ResourceExt as _,
    runtime::{
        WatchStreamExt as _,
        reflector::{self, Store},
        watcher,
    },
};

use k8s_openapi::jiff::Timestamp;

use super::crd::{FIELD_MANAGER, IGNORE_LABEL};
use crate::{cgroup::kubernetes::QosClass, policy::Exclusion, units::MilliCpu};

/// One container's CPU facts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerFacts {
    pub name: String,
    /// `spec.containers[].resources.requests.cpu` (zero when absent).
    pub request: MilliCpu,
    /// `spec.containers[].resources.limits.cpu`: the desired limit.
    pub limit: Option<MilliCpu>,
    /// The limit the kubelet reports as applied (`status.containerStatuses[].resources`).
    pub status_limit: Option<MilliCpu>,
    /// CPU `resizePolicy` is `RestartContainer`.
    pub restart_on_resize: bool,
    /// Runtime container id without its `runtime://` prefix, once running.
    pub container_id: Option<String>,
    /// Its memory is as a Guaranteed pod's must be: a memory limit, and a
    /// request equal to it or absent. With every container so, CPU limits at
    /// the requests would make the pod Guaranteed, which a resize may not do.
    pub memory_pinned: bool,
}

/// The kubelet's view of an in-place resize, from the pod's conditions.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ResizeState {
    #[default]
    Idle,
    /// `PodResizeInProgress`: accepted, being actuated.
    InProgress,
    /// `PodResizePending` with reason `Deferred`: may be done later.
    Deferred(String),
    /// `PodResizePending` with reason `Infeasible`: will not be done on this node.
    Infeasible(String),
    /// `PodResizeInProgress` with reason `Error`.
    Error(String),
}

/// The last resize of a pod's CPU limits made by someone other than MBCAS,
/// from the pod's `managedFields` (a pod's resources change only through the
/// `resize` subresource, and the manager that set a field owns it until
/// another sets it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForeignResize {
    /// Its field manager (`kubectl-patch` for `kubectl patch --subresource resize`).
    pub manager: String,
    /// When that manager last changed the pod's fields (to the second).
    pub at: Timestamp,
    /// The containers whose CPU limit it set.
    pub containers: Vec<String>,
}

/// Field managers of MBCAS's own resizes: its own, and `unknown`, under which
/// the API server recorded the resizes of versions that sent no user agent.
const OWN_RESIZE_MANAGERS: [&str; 2] = [FIELD_MANAGER, "unknown"];

impl ForeignResize {
    /// The latest resize of a CPU limit by a manager that is not MBCAS's, if any.
    pub fn of(pod: &Pod) -> Option<Self> {
        pod.metadata
            .managed_fields
            .iter()
            .flatten()
            .filter(|e| e.subresource.as_deref() == Some(RESIZE_SUBRESOURCE))
            .filter_map(|e| {
                let manager = e.manager.clone()?;
                if OWN_RESIZE_MANAGERS.contains(&manager.as_str()) {
                    return None;
                }
                let containers = cpu_limit_owners(&e.fields_v1.as_ref()?.0);
                let at = e.time.as_ref()?.0;
                (!containers.is_empty()).then_some(ForeignResize {
                    manager,
                    at,
                    containers,
                })
            })
            .max_by_key(|f| f.at)
    }
}

const RESIZE_SUBRESOURCE: &str = "resize";

/// The containers whose `resources.limits.cpu` a managed-fields set owns.
fn cpu_limit_owners(fields: &serde_json::Value) -> Vec<String> {
    let Some(containers) = fields
        .get("f:spec")
        .and_then(|s| s.get("f:containers"))
        .and_then(|c| c.as_object())
    else {
        return Vec::new();
    };
    containers
        .iter()
        .filter(|(_, v)| {
            v.get("f:resources")
                .and_then(|r| r.get("f:limits"))
                .and_then(|l| l.get("f:cpu"))
                .is_some()
        })
        .filter_map(|(k, _)| {
            let key: serde_json::Value = serde_json::from_str(k.strip_prefix("k:")?).ok()?;
            Some(key.get("name")?.as_str()?.to_owned())
        })
        .collect()
}

/// What MBCAS knows about one pod.
#[derive(Clone, Debug, PartialEq)]
pub struct PodFacts {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub node: Option<String>,
    pub qos: QosClass,
    pub containers: Vec<ContainerFacts>,
    /// `spec.resources.limits.cpu`, `spec.resources.requests.cpu`: a CPU
    /// budget set at pod level (KEP-2837), which the pod's containers share.
    pub pod_limit: Option<MilliCpu>,
    pub pod_request: Option<MilliCpu>,
    pub ignored: bool,
    pub priority: Option<i32>,
    /// `status.phase == Running` and not being deleted.
    pub running: bool,
    pub resize: ResizeState,
    /// The last resize of its CPU limits by someone else.
    pub foreign_resize: Option<ForeignResize>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PodError {
    #[error("pod has no {0}")]
    Missing(&'static str),
    #[error("pod {pod}: {field} = {value:?} is not a CPU quantity")]
    Quantity {
        pod: String,
        field: String,
        value: String,
    },
}

/// Millicores of a Kubernetes quantity, rounded up like `Quantity.MilliValue()`
/// (see [`mbcas_common::quantity::millicores`]).
pub fn quantity_millis(s: &str) -> Option<MilliCpu> {
    mbcas_common::quantity::millicores(s).map(MilliCpu)
}

fn cpu_of(
    map: Option<
        &std::collections::BTreeMap<
            String,
            k8s_openapi::apimachinery::pkg::api::resource::Quantity,
        >,
    >,
    pod: &str,
    field: impl FnOnce() -> String,
) -> Result<Option<MilliCpu>, PodError> {
    let Some(q) = map.and_then(|m| m.get("cpu")) else {
        return Ok(None);
    };
    quantity_millis(&q.0)
        .map(Some)
        .ok_or_else(|| PodError::Quantity {
            pod: pod.to_owned(),
            field: field(),
            value: q.0.clone(),
        })
}

fn has_mem(
    map: Option<
        &std::collections::BTreeMap<
            String,
            k8s_openapi::apimachinery::pkg::api::resource::Quantity,
        >,
    >,
) -> bool {
    map.is_some_and(|m| m.contains_key("memory"))
}

/// QoS class as the API server computes it (used when `status.qosClass` is unset).
fn qos_of(containers: &[Container]) -> QosClass {
    let mut any = false;
    let mut all_guaranteed = !containers.is_empty();
    for c in containers {
        let r = c.resources.as_ref();
        let req = r.and_then(|r| r.requests.as_ref());
        let lim = r.and_then(|r| r.limits.as_ref());
        any |= req.is_some_and(|m| !m.is_empty()) || lim.is_some_and(|m| !m.is_empty());
        let cpu_eq = lim.and_then(|l| l.get("cpu")).is_some_and(|l| {
            req.and_then(|r| r.get("cpu"))
                .is_none_or(|r| quantity_millis(&r.0) == quantity_millis(&l.0))
        });
        let mem_eq = lim
            .and_then(|l| l.get("memory"))
            .is_some_and(|l| req.and_then(|r| r.get("memory")).is_none_or(|r| r.0 == l.0));
        all_guaranteed &= cpu_eq && mem_eq && has_mem(lim);
    }
    if all_guaranteed {
        QosClass::Guaranteed
    } else if any {
        QosClass::Burstable
    } else {
        QosClass::BestEffort
    }
}

impl PodFacts {
    pub fn from_pod(pod: &Pod) -> Result<Self, PodError> {
        let uid = pod
            .metadata
            .uid
            .clone()
            .ok_or(PodError::Missing("metadata.uid"))?;
        let name = pod
            .metadata
            .name
            .clone()
            .ok_or(PodError::Missing("metadata.name"))?;
        let namespace = pod
            .metadata
            .namespace
            .clone()
            .ok_or(PodError::Missing("metadata.namespace"))?;
        let spec = pod.spec.as_ref().ok_or(PodError::Missing("spec"))?;
        let status = pod.status.as_ref();
        let id = format!("{namespace}/{name}");
        let mut containers = Vec::with_capacity(spec.containers.len());
        for (i, c) in spec.containers.iter().enumerate() {
            let res = c.resources.as_ref();
            let request = cpu_of(res.and_then(|r| r.requests.as_ref()), &id, || {
                format!("spec.containers[{i}].resources.requests.cpu")
            })?
            .unwrap_or_default();
            let limit = cpu_of(res.and_then(|r| r.limits.as_ref()), &id, || {
                format!("spec.containers[{i}].resources.limits.cpu")
            })?;
            let cs = status
                .and_then(|s| s.container_statuses.as_ref())
                .and_then(|v| v.iter().find(|s| s.name == c.name));
            let status_limit = match cs.and_then(|s| s.resources.as_ref()) {
                Some(r) => cpu_of(r.limits.as_ref(), &id, || {
                    format!("status.containerStatuses[{}].resources.limits.cpu", c.name)
                })?,
                None => None,
            };
            let restart_on_resize = c
                .resize_policy
                .iter()
                .flatten()
                .any(|p| p.resource_name == "cpu" && p.restart_policy == "RestartContainer");
            let container_id = cs
                .and_then(|s| s.container_id.as_deref())
                .map(|s| s.split_once("://").map_or(s, |(_, id)| id).to_owned());
            let memory = |m: Option<
                &std::collections::BTreeMap<
                    String,
                    k8s_openapi::apimachinery::pkg::api::resource::Quantity,
                >,
            >| { m.and_then(|m| m.get("memory")).map(|q| q.0.clone()) };
            let mem_limit = memory(res.and_then(|r| r.limits.as_ref()));
            let mem_request = memory(res.and_then(|r| r.requests.as_ref()));
            let memory_pinned = mem_limit.is_some()
                && mem_request
                    .as_ref()
                    .is_none_or(|r| Some(r) == mem_limit.as_ref());
            containers.push(ContainerFacts {
                name: c.name.clone(),
                request,
                limit,
                status_limit,
                restart_on_resize,
                container_id,
                memory_pinned,
            });
        }
        let pod_res = spec.resources.as_ref();
        let pod_limit = cpu_of(pod_res.and_then(|r| r.limits.as_ref()), &id, || {
            "spec.resources.limits.cpu".to_owned()
        })?;
        let pod_request = cpu_of(pod_res.and_then(|r| r.requests.as_ref()), &id, || {
            "spec.resources.requests.cpu".to_owned()
        })?;
        let qos = match status.and_then(|s| s.qos_class.as_deref()) {
            Some("Guaranteed") => QosClass::Guaranteed,
            Some("Burstable") => QosClass::Burstable,
            Some("BestEffort") => QosClass::BestEffort,
            _ => qos_of(&spec.containers),
        };
        let cond = |t: &str| {
            status
                .and_then(|s| s.conditions.as_ref())
                .and_then(|v| v.iter().find(|c| c.type_ == t && c.status == "True"))
        };
        let msg =
            |c: &k8s_openapi::api::core::v1::PodCondition| c.message.clone().unwrap_or_default();
        let resize = if let Some(c) = cond("PodResizePending") {
            match c.reason.as_deref() {
                Some("Infeasible") => ResizeState::Infeasible(msg(c)),
                _ => ResizeState::Deferred(msg(c)),
            }
        } else if let Some(c) = cond("PodResizeInProgress") {
            match c.reason.as_deref() {
                Some("Error") => ResizeState::Error(msg(c)),
                _ => ResizeState::InProgress,
            }
        } else {
            ResizeState::Idle
        };
        Ok(Self {
            uid,
            ignored: pod
                .labels()
                .get(IGNORE_LABEL)
                .is_some_and(|v| v.eq_ignore_ascii_case("true")),
            namespace,
            name,
            node: spec.node_name.clone(),
            qos,
            containers,
            pod_limit,
            pod_request,
            priority: spec.priority,
            running: status.and_then(|s| s.phase.as_deref()) == Some("Running")
                && pod.metadata.deletion_timestamp.is_none(),
            resize,
            foreign_resize: ForeignResize::of(pod),
        })
    }

    /// Σ CPU requests.
    pub fn request(&self) -> MilliCpu {
        MilliCpu(self.containers.iter().map(|c| c.request.get()).sum())
    }

    /// Σ CPU limits in the spec; `None` when a container has no limit.
    pub fn limit(&self) -> Option<MilliCpu> {
        self.containers
            .iter()
            .map(|c| c.limit.map(MilliCpu::get))
            .sum::<Option<u64>>()
            .map(MilliCpu)
    }

    /// Σ CPU limits the kubelet reports; `None` until every container reports one.
    pub fn status_limit(&self) -> Option<MilliCpu> {
        self.containers
            .iter()
            .map(|c| c.status_limit.map(MilliCpu::get))
            .sum::<Option<u64>>()
            .map(MilliCpu)
    }

    /// The limit the engine counts as the pod's now: the spec's, unless the
    /// kubelet refused to apply it (`Infeasible`, `Error`) — then the one it
    /// reports applied, so that the engine neither believes a limit the pod
    /// does not have nor raises further from it. A deferred or in-flight
    /// resize counts at the spec's (the kubelet will apply it).
    pub fn current_limit(&self) -> Option<MilliCpu> {
        let spec = self.limit()?;
        Some(match self.resize {
            ResizeState::Infeasible(_) | ResizeState::Error(_) => {
                self.status_limit().unwrap_or(spec)
            }
            _ => spec,
        })
    }

    /// Why MBCAS must leave this pod alone, if it must (DESIGN.md §2, Resize).
    pub fn exclusion(&self, excluded_namespaces: &BTreeSet<String>) -> Option<Exclusion> {
        if excluded_namespaces.contains(&self.namespace) {
            Some(Exclusion::Namespace)
        } else if self.ignored {
            Some(Exclusion::OptedOut)
        } else if self.qos == QosClass::Guaranteed {
            Some(Exclusion::Guaranteed)
        } else if self.containers.iter().any(|c| c.restart_on_resize) {
            Some(Exclusion::RestartPolicy)
        } else if self.pod_limit.is_some() || self.pod_request.is_some() {
            // The pod's cgroup quota is the pod-level limit: container limits
            // raised under it change nothing the kernel enforces, and the
            // pod-level request is the pod's weight.
            Some(Exclusion::PodLevel)
        } else if self.limit().is_none() {
            Some(Exclusion::NoLimit)
        } else {
            None
        }
    }

    /// Market weight: the CPU request in millicores (at least 1), times
    /// `1 + priority / 1e9` when priority weighting is on (system-critical
    /// classes, 2e9, weigh three times as much; the default 0 changes nothing).
    pub fn weight(&self, priority_weighting: bool) -> f64 {
        let base = self.request().get().max(1) as f64;
        match (priority_weighting, self.priority) {
            (true, Some(p)) => base * (1.0 + f64::from(p) / 1e9).max(0.01),
            _ => base,
        }
    }
}

/// Drops what MBCAS never reads, so a node's pods cost little memory (of the
/// managed fields, only the resizes are kept: a few hundred bytes).
pub fn prune(pod: &mut Pod) {
    if let Some(fields) = pod.metadata.managed_fields.as_mut() {
        fields.retain(|e| e.subresource.as_deref() == Some(RESIZE_SUBRESOURCE));
    }
    pod.metadata.annotations = None;
    if let Some(spec) = pod.spec.as_mut() {
        spec.volumes = None;
        spec.affinity = None;
        spec.tolerations = None;
        spec.init_containers = None;
        spec.ephemeral_containers = None;
        for c in &mut spec.containers {
            c.env = None;
            c.env_from = None;
            c.volume_mounts = None;
            c.command = None;
            c.args = None;
            c.ports = None;
            c.liveness_probe = None;
            c.readiness_probe = None;
            c.startup_probe = None;
            c.lifecycle = None;
            c.security_context = None;
        }
    }
    if let Some(status) = pod.status.as_mut() {
        status.init_container_statuses = None;
        status.ephemeral_container_statuses = None;
        status.pod_ips = None;
        status.host_ips = None;
    }
}

/// The watcher configuration of this node's pods.
pub fn node_pods_config(node: &str) -> watcher::Config {
    watcher::Config::default().fields(&format!("spec.nodeName={node}"))
}

/// How many pod changes may wait for the resize controller; more are dropped
/// (the controller looks at each pending allocation again within its
/// `pending_recheck`, and the allocations' own watch wakes it too).
pub const POD_TRIGGERS: usize = 1024;

/// The resize controller's wake-ups: each pod the reflector applies.
pub type PodTriggers = futures::channel::mpsc::Receiver<Arc<Pod>>;

/// A reflector over this node's pods: the store, a stream that must be polled
/// to keep it current, and the pods it applies, for the resize controller.
///
/// Not a kube shared reflector with a subscriber: in kube-runtime 5.0 a
/// subscriber that reads the reference of a pod already gone from the store
/// returns `Pending` without asking to be woken, so under pod churn the
/// controller stopped reading, the reflector blocked on the subscriber's full
/// buffer and the pod store went stale: on the real node, after six minutes
/// of `cargo xtask soak --node`, the daemon managed no new pod. Here the
/// store never waits for the controller: a wake-up that does not fit is
/// dropped.
pub fn pod_reflector(
    client: Client,
    node: &str,
) -> (
    Store<Pod>,
    impl Stream<Item = Result<(), watcher::Error>> + Send + 'static,
    PodTriggers,
) {
    let api: Api<Pod> = Api::all(client);
    let events = watcher(api, node_pods_config(node))
        .default_backoff()
        .modify(prune);
    reflect_pods(events)
}

/// [`pod_reflector`] over any stream of watch events.
pub fn reflect_pods<S>(
    events: S,
) -> (
    Store<Pod>,
    impl Stream<Item = Result<(), watcher::Error>> + Send + 'static,
    PodTriggers,
)
where
    S: Stream<Item = Result<watcher::Event<Pod>, watcher::Error>> + Send + 'static,
{
    let (store, writer) = reflector::store::<Pod>();
    let (mut tx, rx) = futures::channel::mpsc::channel(POD_TRIGGERS);
    let stream = events
        .reflect(writer)
        .applied_objects()
        .map_ok(move |pod: Pod| {
            if let Err(e) = tx.try_send(Arc::new(pod))
                && e.is_full()
            {
                tracing::debug!("resize controller behind: a pod change dropped from its wake-ups");
            }
        });
    (store, stream, rx)
}

/// This node's allocatable CPU, kept current by a watch on the Node object.
pub fn node_reflector(
    client: Client,
    node: &str,
) -> (Store<Node>, impl Stream<Item = ()> + Send + 'static) {
    let (store, writer) = reflector::store::<Node>();
    let api: Api<Node> = Api::all(client);
    let cfg = watcher::Config::default().fields(&format!("metadata.name={node}"));
    let stream = watcher(api, cfg)
        .default_backoff()
        .modify(|n: &mut Node| {
            n.metadata.managed_fields = None;
            n.metadata.annotations = None;
            if let Some(s) = n.status.as_mut() {
                s.images = None;
                s.conditions = None;
            }
        })
        .reflect(writer)
        .map(|_| ());
    (store, stream)
}

/// Allocatable CPU of a Node object (status.allocatable, else status.capacity).
pub fn node_allocatable(node: &Node) -> Option<MilliCpu> {
    let st = node.status.as_ref()?;
    st.allocatable
        .as_ref()
        .and_then(|m| m.get("cpu"))
        .or_else(|| st.capacity.as_ref().and_then(|m| m.get("cpu")))
        .and_then(|q| quantity_millis(&q.0))
}

/// Test fixtures shared by the controller's, publisher's and restore's tests.
#[cfg(test)]
impl ContainerFacts {
    /// A container with a CPU request and limit, as the kubelet reports them.
    pub(crate) fn limited(name: &str, request: u64, limit: u64) -> Self {
        ContainerFacts {
            name: name.into(),
            request: MilliCpu(request),
            limit: Some(MilliCpu(limit)),
            status_limit: Some(MilliCpu(limit)),
            restart_on_resize: false,
            container_id: None,
            memory_pinned: false,
        }
    }
}

#[cfg(test)]
impl PodFacts {
    /// A running Burstable pod `namespace/web` (UID `uid`) on node `n1`.
    pub(crate) fn burstable(uid: &str, namespace: &str, containers: Vec<ContainerFacts>) -> Self {
        PodFacts {
            uid: uid.into(),
            namespace: namespace.into(),
            name: "web".into(),
            node: Some("n1".into()),
            qos: QosClass::Burstable,
            containers,
            pod_limit: None,
            pod_request: None,
            ignored: false,
            priority: None,
            running: true,
            resize: ResizeState::Idle,
            foreign_resize: None,
        }
    }
}

#[cfg(test)]
mod tests;
