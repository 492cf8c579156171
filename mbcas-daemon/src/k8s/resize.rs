//! The in-process resize controller: applies this node's PodAllocations to
//! their pods through the `pods/resize` subresource.
//!
//! A `kube::runtime::Controller` over the PodAllocations labelled
//! `mbcas.io/node=<node>`, also woken by the node's pod events (shared with the
//! pod index). Each reconcile is [`plan`] — pure: the PodAllocation, the pod's
//! facts, what this controller remembers, the time — followed by the few API
//! calls the plan asks for:
//!
//! 1. the pod's original limits are written to the status before its first change;
//! 2. a strategic-merge patch of `spec.containers[].resources.limits.cpu` only
//!    (never requests, never below a container's request, never on Guaranteed
//!    pods, `RestartContainer` CPU resize policies, excluded namespaces or pods
//!    labelled `mbcas.io/ignore=true`). How fast limits move (steps, cooldowns)
//!    is the policy's alone: it lets some decisions through at once (a
//!    throttled pod raised to its fair share, a neighbour capped to its share
//!    under contention), and a second pacer here with plain step limits turned
//!    each of them into a train of patches (on the real node 300 → 450 → 675
//!    → 1012 → 1518 → 1972 m for one decision, and a cap to 100 m applied as
//!    987 m);
//! 3. the status, only when it differs from what is stored (no wall-clock
//!    churn, so the controller does not wake itself up) and is not a transition
//!    the kubelet is expected to end within [`ControllerConfig::kubelet_grace`];
//! 4. a `ResizeFailed` warning Event on the pod when a resize fails (the kubelet
//!    posts its own `ResizeStarted`/`ResizeCompleted` events for the rest).
//!
//! A resize the kubelet carries out promptly costs three API writes: the
//! allocation's spec (the publisher's), the resize PATCH and one status write
//! (`Applied`); the first resize of a pod one more, the status that puts its
//! original limits on record before anything changes.
//!
//! Phases: `Pending` once the spec is patched and until the kubelet reports the
//! new limits in `status.containerStatuses[].resources` (`Applied`) — written
//! only when the kubelet has not reported within the grace period; `Failed`
//! when the API refuses the resize, the kubelet reports it `Infeasible`, or the
//! pod is gone; `Skipped` for pods MBCAS must not touch. After a failure the
//! controller waits (1 min, doubling up to 10 min) before it patches that pod
//! again; API errors that are not a refusal (429, 5xx, timeouts) are retried
//! with the same backoff, conflicts at once.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::StreamExt as _;
use k8s_openapi::{
    api::core::v1::{ObjectReference, Pod},
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::{self, Timestamp},
};
use kube::{
    Api, Client, Resource as _, ResourceExt as _,
    api::{Patch, PatchParams},
    runtime::{
        Controller,
        controller::Action,
        events::{Event, EventType, Recorder, Reporter},
        reflector::{ObjectRef, Store},
        watcher,
    },
};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{
    crd::{
        CONDITION_APPLIED, ContainerAllocation, CpuQuantity, FIELD_MANAGER, NODE_LABEL,
        OperatorChange, OriginalLimit, Phase, PodAllocation, PodAllocationStatus,
    },
    early,
    pods::{PodFacts, ResizeState},
};
use crate::{
    cgroup::CgroupFsError, error::error_chain, metrics::Metrics, policy::Exclusion, units::MilliCpu,
};

/// What the controller enforces, whatever a PodAllocation asks.
#[derive(Clone, Debug, PartialEq)]
pub struct ControllerConfig {
    pub node_name: String,
    pub excluded_namespaces: BTreeSet<String>,
    /// First wait after a failure; doubles per failure up to `max_failure_backoff`.
    pub failure_backoff: Duration,
    pub max_failure_backoff: Duration,
    /// How often a Pending allocation is looked at again without pod events.
    pub pending_recheck: Duration,
    /// How long the pod watch may lag behind this controller's own resize: the
    /// same change is not patched again within it.
    pub own_patch_settle: Duration,
    /// How long after a resize PATCH the kubelet may take to report it before
    /// the status says `Pending`: a resize the kubelet reports within it is
    /// written once, as `Applied`.
    pub kubelet_grace: Duration,
    /// How long a pod whose CPU limits someone else resized is left alone
    /// (its limits are adopted as the original at once).
    pub operator_hold: Duration,
}

impl ControllerConfig {
    pub fn new(node_name: impl Into<String>) -> Self {
        Self {
            node_name: node_name.into(),
            excluded_namespaces: BTreeSet::from(["kube-system".to_owned()]),
            failure_backoff: Duration::from_secs(60),
            max_failure_backoff: Duration::from_secs(600),
            pending_recheck: Duration::from_secs(30),
            own_patch_settle: Duration::from_secs(10),
            kubelet_grace: Duration::from_secs(10),
            operator_hold: Duration::from_secs(30 * 60),
        }
    }

    fn backoff(&self, failures: u32) -> Duration {
        let f = self
            .failure_backoff
            .saturating_mul(1u32 << failures.saturating_sub(1).min(16));
        f.min(self.max_failure_backoff).max(self.failure_backoff)
    }
}

/// What the controller remembers about one pod's PodAllocation (in memory
/// only: a restart forgets backoffs).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Memory {
    /// The pod this is about: a pod recreated under the same name (a
    /// StatefulSet's) is another pod, and inherits none of it.
    pub pod_uid: String,
    /// When the controller last patched this pod.
    pub last_change: Option<Duration>,
    /// What that patch set (container, limit).
    pub patched: Option<Vec<(String, MilliCpu)>>,
    /// When the current request was made (for the resize latency metric).
    pub requested_at: Option<Duration>,
    /// Consecutive failures, and when patching may be tried again.
    pub failures: u32,
    pub retry_at: Option<Duration>,
    /// The original limits this controller recorded, until the watch shows
    /// them in the status (a stale copy of the allocation must not make the
    /// controller record the limits it has already changed as the original).
    pub original: Option<Vec<OriginalLimit>>,
    /// The status this controller last wrote: a reconcile of a copy of the
    /// allocation that predates that write (the watch lags the controller's own
    /// writes) plans the same status again, and writing it would be a wasted
    /// API write per resize.
    pub written: Option<PodAllocationStatus>,
    /// The quotas written into the pod's cgroups ahead of the kubelet for the
    /// last resize, until the kubelet applied or refused it.
    pub early: Option<Vec<early::Written>>,
}

/// Whether two statuses record the same thing (the condition's transition time
/// apart: a plan made from a stale copy stamps a new one).
pub fn same_record(a: &PodAllocationStatus, b: &PodAllocationStatus) -> bool {
    let mut b = b.clone();
    if a.conditions.len() != b.conditions.len() {
        return false;
    }
    for (cb, ca) in b.conditions.iter_mut().zip(&a.conditions) {
        cb.last_transition_time = ca.last_transition_time.clone();
    }
    *a == b
}

/// An event to publish about the pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedEvent {
    pub warning: bool,
    pub reason: &'static str,
    pub note: String,
}

/// What one reconcile decided.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub status: PodAllocationStatus,
    /// Containers to patch, with their new CPU limits.
    pub resize: Option<Vec<(String, MilliCpu)>>,
    /// Published after the status is written.
    pub event: Option<PlannedEvent>,
    pub requeue: Option<Duration>,
    /// The status is a transition the kubelet is expected to end soon (a
    /// resize just requested, not reported yet): it is not written, and the
    /// stored status keeps its phase and `observedGeneration` until the
    /// kubelet's verdict (or the grace period's end) is written instead.
    pub quiet: bool,
}

fn exclusion_reason(e: Exclusion) -> (&'static str, &'static str) {
    match e {
        Exclusion::Guaranteed => (
            "Guaranteed",
            "Guaranteed pods are never resized (the QoS class may not change)",
        ),
        Exclusion::OptedOut => ("OptedOut", "the pod is labelled mbcas.io/ignore=true"),
        Exclusion::Namespace => (
            "ExcludedNamespace",
            "pods in this namespace are never resized",
        ),
        Exclusion::NoLimit => ("NoCpuLimit", "a container has no CPU limit to resize"),
        Exclusion::RestartPolicy => (
            "RestartContainerPolicy",
            "a container's CPU resizePolicy is RestartContainer: a resize would restart it",
        ),
        Exclusion::PodLevel => (
            "PodLevelResources",
            "the pod's CPU is set at pod level (spec.resources), which MBCAS does not resize: \
             it resizes container limits only",
        ),
    }
}

fn quantity(m: MilliCpu) -> CpuQuantity {
    CpuQuantity(m)
}

/// A container's limit now and the one this controller will ask for.
#[derive(Clone, Debug, PartialEq)]
struct Desired {
    name: String,
    current: MilliCpu,
    desired: MilliCpu,
}

/// Why an allocation cannot be acted on: its phase, reason code and message.
type Refusal = (Phase, &'static str, String);

/// Decides what to do about one PodAllocation. Pure: the controller's clock
/// (`now`, for backoffs and its own patch settling) and the wall clock (`wall`, for the
/// condition's transition time) come in.
pub fn plan(
    pa: &PodAllocation,
    pod: Option<Result<&PodFacts, String>>,
    cfg: &ControllerConfig,
    mem: &Memory,
    now: Duration,
    wall: Timestamp,
) -> Plan {
    let old = pa.status.clone().unwrap_or_default();
    let mut status = PodAllocationStatus {
        original: old.original.clone(),
        operator_change: old.operator_change.clone(),
        observed_generation: pa.metadata.generation,
        ..Default::default()
    };
    let done = |status, resize, event, requeue, quiet| {
        finish(&old, status, resize, event, requeue, quiet, wall)
    };
    let refused = |mut status: PodAllocationStatus, (phase, reason, message): Refusal| {
        status.phase = phase;
        status.reason = Some(reason.to_owned());
        status.message = Some(message);
        done(status, None, None, None, false)
    };
    let facts = pod.as_ref().and_then(|r| r.as_ref().ok().copied());
    let pod = match admit(pa, pod, cfg) {
        Ok(pod) => pod,
        Err(refusal) => {
            // Opted out after MBCAS changed it: the limits it had before go
            // back (once; the label is the owner taking the pod back).
            if let Some(changes) = facts.and_then(|f| opted_out_restore(pa, f, cfg, mem, now)) {
                let back = changes
                    .iter()
                    .map(|(n, l)| format!("{n}={l}"))
                    .collect::<Vec<_>>()
                    .join(", ");
                let (phase, reason, message) = refusal;
                status.phase = phase;
                status.reason = Some(reason.to_owned());
                status.message = Some(format!(
                    "{message}: its original CPU limits put back ({back})"
                ));
                return done(
                    status,
                    Some(changes),
                    None,
                    Some(cfg.pending_recheck),
                    false,
                );
            }
            return refused(status, refusal);
        }
    };
    // Someone else resized the pod: their limits are the original now, and
    // the pod is theirs until the hold ends.
    let mut adopted = None;
    if let Some((change, new)) = operator_change(&old, pod, cfg) {
        let held = change.hold_until.0 > wall;
        let message = format!(
            "CPU limits set by {} at {} ({}): adopted as the original; {}",
            change.manager,
            change.changed_at.0,
            limits_text(pod),
            if held {
                format!("MBCAS leaves the pod alone until {}", change.hold_until.0)
            } else {
                "MBCAS manages the pod from them".to_owned()
            }
        );
        if new {
            status.original = current_limits(pod);
            adopted = Some(PlannedEvent {
                warning: false,
                reason: EVENT_OPERATOR_CHANGE,
                note: message.clone(),
            });
        }
        status.operator_change = Some(change.clone());
        if held {
            record_applied(&mut status, pod);
            status.phase = Phase::Skipped;
            status.reason = Some(REASON_OPERATOR_CHANGE.to_owned());
            status.message = Some(message);
            let requeue = Duration::try_from(change.hold_until.0.duration_since(wall)).ok();
            return done(status, None, adopted, requeue, false);
        }
    }
    let mut notes: Vec<String> = Vec::new();
    let desired = match safe_limits(pa, pod, &mut notes) {
        Ok(d) => d,
        Err(refusal) => return refused(status, refusal),
    };
    status.original = originals(status.original, &pa.spec.original, mem, pod);
    record_applied(&mut status, pod);
    // The change this controller patched a moment ago, on a copy of the pod
    // the watch has not updated yet (the allocation's own status write can
    // wake the controller first): wait for the watch — neither patch again
    // nor judge the old limits (they would be reported as applied).
    let wanted: Vec<(String, MilliCpu)> = desired
        .iter()
        .filter(|d| d.desired != d.current)
        .map(|d| (d.name.clone(), d.desired))
        .collect();
    if !wanted.is_empty()
        && mem.patched.as_ref() == Some(&wanted)
        && let Some(settled) = mem
            .last_change
            .map(|t| t + cfg.own_patch_settle)
            .filter(|&t| t > now)
    {
        return Plan {
            status: old,
            resize: None,
            event: None,
            requeue: Some(settled - now),
            quiet: false,
        };
    }
    let changes = wanted;
    let note = (!notes.is_empty()).then(|| notes.join("; "));
    let total_desired = MilliCpu(desired.iter().map(|d| d.desired.get()).sum());
    if !changes.is_empty() {
        if let Some(retry) = mem.retry_at.filter(|&t| t > now) {
            // Still backing off after a failure: keep the failure on record.
            status.phase = Phase::Failed;
            status.reason = old.reason.clone().or(Some("ResizeFailed".to_owned()));
            status.message = old.message.clone();
            return done(status, None, adopted, Some(retry - now), false);
        }
        request(&mut status, &desired, &changes, note.as_deref());
        let recheck = cfg.kubelet_grace.min(cfg.pending_recheck);
        let quiet = adopted.is_none();
        return done(status, Some(changes), adopted, Some(recheck), quiet);
    }
    // The spec holds what we want: what does the kubelet say?
    // Within the grace period after this controller's own resize, waiting for
    // the kubelet is not news: look again when it ends.
    let grace = mem
        .requested_at
        .map(|t| t + cfg.kubelet_grace)
        .filter(|&until| until > now)
        .map(|until| until - now);
    let verdict = kubelet_verdict(
        &mut status,
        pod,
        &desired,
        note.as_deref(),
        total_desired,
        grace.map_or(cfg.pending_recheck, |g| g.min(cfg.pending_recheck)),
    );
    let quiet = verdict.waiting && grace.is_some() && adopted.is_none();
    done(
        status,
        None,
        verdict.event.or(adopted),
        verdict.requeue,
        quiet,
    )
}

/// The reason of a status while an operator's change is held.
pub const REASON_OPERATOR_CHANGE: &str = "OperatorChange";
/// The reason of the Event that says an operator's change was adopted.
pub const EVENT_OPERATOR_CHANGE: &str = "OperatorChangeAdopted";

/// The last resize of the pod by someone else, and whether it is news: newer
/// than the one on record (an older resize by another manager that still
/// owns a container's limit is not).
fn operator_change(
    old: &PodAllocationStatus,
    pod: &PodFacts,
    cfg: &ControllerConfig,
) -> Option<(OperatorChange, bool)> {
    let seen = pod.foreign_resize.as_ref()?;
    match &old.operator_change {
        Some(r) if r.changed_at.0 >= seen.at => Some((r.clone(), false)),
        _ => {
            let hold = jiff::SignedDuration::try_from(cfg.operator_hold)
                .unwrap_or(jiff::SignedDuration::MAX);
            let change = OperatorChange {
                manager: seen.manager.clone(),
                changed_at: Time(seen.at),
                hold_until: Time(seen.at.checked_add(hold).unwrap_or(Timestamp::MAX)),
            };
            Some((change, true))
        }
    }
}

/// The pod's CPU limits now, as originals.
fn current_limits(pod: &PodFacts) -> Vec<OriginalLimit> {
    pod.containers
        .iter()
        .map(|c| OriginalLimit {
            name: c.name.clone(),
            cpu_limit: c.limit.map(quantity),
        })
        .collect()
}

/// `name=limit, …` of the pod's containers.
fn limits_text(pod: &PodFacts) -> String {
    pod.containers
        .iter()
        .map(|c| match c.limit {
            Some(l) => format!("{}={l}", c.name),
            None => format!("{}=none", c.name),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The original limits to put back on a pod its owner opted out
/// (`mbcas.io/ignore=true`) after MBCAS changed it; `None` when there is
/// nothing to put back, the originals are not on record, a refusal's backoff
/// runs, or the same patch was just made.
fn opted_out_restore(
    pa: &PodAllocation,
    pod: &PodFacts,
    cfg: &ControllerConfig,
    mem: &Memory,
    now: Duration,
) -> Option<Vec<(String, MilliCpu)>> {
    if pod.uid != pa.spec.pod_uid
        || pod.exclusion(&cfg.excluded_namespaces) != Some(Exclusion::OptedOut)
        || mem.retry_at.is_some_and(|t| t > now)
    {
        return None;
    }
    let changes: Vec<(String, MilliCpu)> = pa
        .originals()
        .iter()
        .filter_map(|o| {
            let c = pod.containers.iter().find(|c| c.name == o.name)?;
            let original = o.cpu_limit?.millis();
            (c.limit.is_some() && c.limit != Some(original) && original >= c.request)
                .then(|| (c.name.clone(), original))
        })
        .collect();
    let just_patched = mem.patched.as_ref() == Some(&changes)
        && mem
            .last_change
            .is_some_and(|t| t + cfg.own_patch_settle > now);
    (!changes.is_empty() && !just_patched).then_some(changes)
}

/// The pod this allocation is for, or why it cannot be acted on.
fn admit<'a>(
    pa: &PodAllocation,
    pod: Option<Result<&'a PodFacts, String>>,
    cfg: &ControllerConfig,
) -> Result<&'a PodFacts, Refusal> {
    let pod_id = format!(
        "{}/{}",
        pa.namespace().unwrap_or_default(),
        pa.spec.pod_name
    );
    let pod = match pod {
        None => {
            return Err((
                Phase::Failed,
                "PodNotFound",
                format!("pod {pod_id} does not exist on node {}", cfg.node_name),
            ));
        }
        Some(Err(e)) => return Err((Phase::Failed, "InvalidPod", e)),
        Some(Ok(p)) => p,
    };
    if pod.uid != pa.spec.pod_uid {
        return Err((
            Phase::Failed,
            "PodReplaced",
            format!(
                "pod {pod_id} now has UID {}, this allocation was made for {}",
                pod.uid, pa.spec.pod_uid
            ),
        ));
    }
    if let Some(ex) = pod.exclusion(&cfg.excluded_namespaces) {
        let (reason, message) = exclusion_reason(ex);
        return Err((Phase::Skipped, reason, message.to_owned()));
    }
    Ok(pod)
}

/// The desired limit of each container, made safe: never below the request,
/// never 0. What was changed goes into `notes`.
fn safe_limits(
    pa: &PodAllocation,
    pod: &PodFacts,
    notes: &mut Vec<String>,
) -> Result<Vec<Desired>, Refusal> {
    let mut desired = Vec::with_capacity(pa.spec.containers.len());
    for want in &pa.spec.containers {
        let Some(c) = pod.containers.iter().find(|c| c.name == want.name) else {
            return Err((
                Phase::Failed,
                "InvalidSpec",
                format!(
                    "container {:?} is not in pod {}/{}",
                    want.name,
                    pa.namespace().unwrap_or_default(),
                    pa.spec.pod_name
                ),
            ));
        };
        // exclusion() guarantees every container has a limit here.
        let current = c.limit.unwrap_or(want.cpu_limit.millis());
        let mut d = want.cpu_limit.millis();
        if d < c.request {
            notes.push(format!(
                "{}: {} raised to its request {}",
                c.name, d, c.request
            ));
            d = c.request;
        }
        if d == MilliCpu::ZERO {
            notes.push(format!("{}: a CPU limit of 0 is never written", c.name));
            d = current;
        }
        desired.push(Desired {
            name: c.name.clone(),
            current,
            desired: d,
        });
    }
    // Every container at its request with its memory pinned would make the
    // pod Guaranteed, which the API refuses on a resize (the QoS class may
    // not change): one container stays a quantum above its request.
    let at_requests = desired.iter().all(|d| {
        pod.containers
            .iter()
            .find(|c| c.name == d.name)
            .is_some_and(|c| c.memory_pinned && d.desired == c.request)
    });
    if at_requests
        && desired.len() == pod.containers.len()
        && let Some(first) = desired.first_mut()
    {
        let to = MilliCpu(first.desired.get() + crate::market::QUANTUM);
        notes.push(format!(
            "{}: {} kept at {to}: at every request the pod would turn Guaranteed, which a resize may not do",
            first.name, first.desired
        ));
        first.desired = to;
    }
    Ok(desired)
}

/// The original limits on record: the status's, else the spec's (the node
/// daemon's, written before any resize), else what this controller recorded
/// and the watch has not shown yet, else the pod's limits now.
fn originals(
    recorded: Vec<OriginalLimit>,
    spec: &[OriginalLimit],
    mem: &Memory,
    pod: &PodFacts,
) -> Vec<OriginalLimit> {
    if !recorded.is_empty() {
        return recorded;
    }
    if !spec.is_empty() {
        return spec.to_vec();
    }
    if let Some(o) = &mem.original {
        return o.clone();
    }
    current_limits(pod)
}

/// The limits the kubelet reports, when it reports one for every container.
fn record_applied(status: &mut PodAllocationStatus, pod: &PodFacts) {
    let applied: Option<Vec<ContainerAllocation>> = pod
        .containers
        .iter()
        .map(|c| {
            c.status_limit.map(|l| ContainerAllocation {
                name: c.name.clone(),
                cpu_limit: quantity(l),
            })
        })
        .collect();
    if let Some(a) = applied {
        status.applied_cpu_limit = Some(quantity(MilliCpu(
            a.iter().map(|c| c.cpu_limit.millis().get()).sum(),
        )));
        status.applied = a;
    }
}

/// The status of a resize about to be requested.
fn request(
    status: &mut PodAllocationStatus,
    desired: &[Desired],
    changes: &[(String, MilliCpu)],
    note: Option<&str>,
) {
    status.phase = Phase::Pending;
    status.reason = Some("ResizeRequested".to_owned());
    let what = changes
        .iter()
        .map(|(n, d)| {
            let cur = desired
                .iter()
                .find(|x| &x.name == n)
                .map_or(MilliCpu::ZERO, |x| x.current);
            format!("{n}: {cur} → {d}")
        })
        .collect::<Vec<_>>()
        .join(", ");
    status.message = Some(match note {
        Some(n) => format!("CPU limit {what} requested ({n})"),
        None => format!("CPU limit {what} requested"),
    });
}

/// What the kubelet's report means for the allocation.
struct Verdict {
    event: Option<PlannedEvent>,
    requeue: Option<Duration>,
    /// The spec holds the new limits and the kubelet has not reported them yet.
    waiting: bool,
}

/// With the spec as wanted: the status from what the kubelet reports, the
/// event to publish and when to look again.
fn kubelet_verdict(
    status: &mut PodAllocationStatus,
    pod: &PodFacts,
    desired: &[Desired],
    note: Option<&str>,
    total_desired: MilliCpu,
    pending_recheck: Duration,
) -> Verdict {
    let reported_all = desired.iter().all(|d| {
        pod.containers
            .iter()
            .find(|c| c.name == d.name)
            .is_some_and(|c| c.status_limit == Some(d.current))
    });
    let mut set = |phase, reason: &str, message: String| {
        status.phase = phase;
        status.reason = Some(reason.to_owned());
        status.message = Some(message);
    };
    let failure = |note: String| PlannedEvent {
        warning: true,
        reason: "ResizeFailed",
        note,
    };
    match &pod.resize {
        ResizeState::Infeasible(m) => {
            set(
                Phase::Failed,
                "Infeasible",
                format!("the kubelet cannot resize the pod: {m}"),
            );
            Verdict {
                event: Some(failure(format!("resize infeasible: {m}"))),
                requeue: None,
                waiting: false,
            }
        }
        ResizeState::Error(m) => {
            set(
                Phase::Failed,
                "ResizeError",
                format!("the kubelet failed to resize the pod: {m}"),
            );
            Verdict {
                event: Some(failure(format!("resize error: {m}"))),
                requeue: None,
                waiting: false,
            }
        }
        ResizeState::Deferred(m) => {
            set(
                Phase::Pending,
                "ResizeDeferred",
                format!("the kubelet deferred the resize: {m}"),
            );
            Verdict {
                event: None,
                requeue: Some(pending_recheck),
                waiting: false,
            }
        }
        ResizeState::Idle | ResizeState::InProgress if reported_all => {
            set(
                Phase::Applied,
                "ResizeApplied",
                match note {
                    Some(n) => format!("the kubelet reports CPU limit {total_desired} ({n})"),
                    None => format!("the kubelet reports CPU limit {total_desired}"),
                },
            );
            // No event: the kubelet posts ResizeCompleted with the limits.
            Verdict {
                event: None,
                requeue: None,
                waiting: false,
            }
        }
        ResizeState::Idle | ResizeState::InProgress => {
            set(
                Phase::Pending,
                "WaitingForKubelet",
                format!(
                    "the pod's spec has CPU limit {total_desired}; the kubelet has not reported it yet"
                ),
            );
            Verdict {
                event: None,
                requeue: Some(pending_recheck),
                waiting: true,
            }
        }
    }
}

/// Adds the `Applied` condition (its transition time, `wall`, kept unless its
/// status changed) and drops events that repeat the phase already on record.
fn finish(
    old: &PodAllocationStatus,
    mut status: PodAllocationStatus,
    resize: Option<Vec<(String, MilliCpu)>>,
    event: Option<PlannedEvent>,
    requeue: Option<Duration>,
    quiet: bool,
    wall: Timestamp,
) -> Plan {
    let cond_status = match status.phase {
        Phase::Applied => "True",
        Phase::Pending => "Unknown",
        Phase::Failed | Phase::Skipped => "False",
    };
    let prev = old.conditions.iter().find(|c| c.type_ == CONDITION_APPLIED);
    let last_transition_time = match prev {
        Some(p) if p.status == cond_status => p.last_transition_time.clone(),
        _ => Time(wall),
    };
    status.conditions = vec![Condition {
        type_: CONDITION_APPLIED.to_owned(),
        status: cond_status.to_owned(),
        reason: status
            .reason
            .clone()
            .unwrap_or_else(|| status.phase.to_string()),
        message: status.message.clone().unwrap_or_default(),
        observed_generation: status.observed_generation,
        last_transition_time,
    }];
    // An event that only repeats the recorded phase and reason is not news.
    let event = event.filter(|e| {
        old.phase != status.phase
            || old.reason != status.reason
            || e.warning && old.message != status.message
    });
    Plan {
        status,
        resize,
        event,
        requeue,
        quiet,
    }
}

/// Shared state of the controller's reconciles.
pub struct Context {
    pub client: Client,
    pub pods: Store<Pod>,
    pub cfg: ControllerConfig,
    pub memory: Mutex<HashMap<ObjectRef<PodAllocation>, Memory>>,
    pub recorder: Recorder,
    pub metrics: Option<Metrics>,
    /// Monotonic origin of the `now` handed to [`plan`].
    pub started: Instant,
    /// The managed pods' cgroups, when increases go into them ahead of the
    /// kubelet ([`early`]).
    pub early: Option<early::CgroupBook>,
    /// The managed pods' cgroups with the weights the weight lever lowered,
    /// put back when the kubelet resets them in carrying out a resize
    /// ([`early::CgroupBook::reassert_weight`]).
    pub weights: Option<early::CgroupBook>,
}

impl Context {
    pub fn new(
        client: Client,
        pods: Store<Pod>,
        cfg: ControllerConfig,
        metrics: Option<Metrics>,
    ) -> Self {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: FIELD_MANAGER.to_owned(),
                instance: Some(cfg.node_name.clone()),
            },
        );
        Self {
            client,
            pods,
            cfg,
            memory: Mutex::new(HashMap::new()),
            recorder,
            metrics,
            started: Instant::now(),
            early: None,
            weights: None,
        }
    }

    /// Puts a held pod's lowered weight back into its cgroup as soon as a
    /// resize of it is applied (the kubelet resets the weight then).
    #[must_use]
    pub fn with_weight_lever(mut self, book: early::CgroupBook) -> Self {
        self.weights = Some(book);
        self
    }

    /// Increases also go into the pods' cgroups in `book` as soon as the API
    /// server accepts them.
    #[must_use]
    pub fn with_early_quota(mut self, book: early::CgroupBook) -> Self {
        self.early = Some(book);
        self
    }

    fn now(&self) -> Duration {
        self.started.elapsed()
    }

    /// What is remembered of the allocation `key` for the pod `pod_uid`
    /// (nothing when it was another pod of the same name).
    fn memory(&self, key: &ObjectRef<PodAllocation>, pod_uid: &str) -> Memory {
        self.memory
            .lock()
            .ok()
            .and_then(|m| m.get(key).filter(|mem| mem.pod_uid == pod_uid).cloned())
            .unwrap_or_else(|| Memory {
                pod_uid: pod_uid.to_owned(),
                ..Memory::default()
            })
    }

    fn remember(&self, key: ObjectRef<PodAllocation>, mem: Memory) {
        if let Ok(mut m) = self.memory.lock() {
            m.insert(key, mem);
        }
    }

    fn forget(&self, key: &ObjectRef<PodAllocation>) {
        if let Ok(mut m) = self.memory.lock() {
            m.remove(key);
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ResizeError {
    #[error("PodAllocation has no namespace")]
    NoNamespace,
    #[error("writing the status of PodAllocation {name}")]
    Status {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("resizing pod {name}")]
    Resize {
        name: String,
        #[source]
        source: kube::Error,
    },
}

impl ResizeError {
    /// The PodAllocation whose status was written no longer exists.
    pub fn gone(&self) -> bool {
        matches!(self, Self::Status { source: kube::Error::Api(s), .. } if s.code == 404)
    }
}

/// The strategic-merge patch of CPU limits only.
pub fn resize_patch(changes: &[(String, MilliCpu)]) -> serde_json::Value {
    let containers: Vec<serde_json::Value> = changes
        .iter()
        .map(|(name, cpu)| {
            serde_json::json!({
                "name": name,
                "resources": {"limits": {"cpu": CpuQuantity(*cpu).to_string()}}
            })
        })
        .collect();
    serde_json::json!({"spec": {"containers": containers}})
}

/// Whether an API error is the server refusing the request (no use retrying
/// the same thing soon) rather than a transient failure.
fn is_refusal(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if matches!(s.code, 400 | 403 | 404 | 422))
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

/// PATCHes `pods/resize` with the new CPU limits, retrying a conflict (409)
/// twice at once: the kubelet updates the pod's status concurrently.
pub(crate) async fn patch_resize(
    pods: &Api<Pod>,
    name: &str,
    changes: &[(String, MilliCpu)],
) -> Result<Pod, kube::Error> {
    let patch = resize_patch(changes);
    let mut attempt = 0;
    loop {
        attempt += 1;
        match pods
            .patch_resize(
                name,
                &PatchParams {
                    field_manager: Some(FIELD_MANAGER.to_owned()),
                    ..PatchParams::default()
                },
                &Patch::Strategic(&patch),
            )
            .await
        {
            Err(e) if is_conflict(&e) && attempt < 3 => continue,
            other => return other,
        }
    }
}

async fn write_status(
    api: &Api<PodAllocation>,
    name: &str,
    status: &PodAllocationStatus,
) -> Result<(), ResizeError> {
    let patch = serde_json::json!({
        "apiVersion": "allocation.mbcas.io/v1alpha1",
        "kind": "PodAllocation",
        "status": status,
    });
    tracing::debug!(allocation = name, phase = %status.phase, reason = ?status.reason, observed_generation = ?status.observed_generation, applied = ?status.applied_cpu_limit, "status write");
    api.patch_status(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map(|_| ())
    .map_err(|source| ResizeError::Status {
        name: name.to_owned(),
        source,
    })
}

async fn publish(ctx: &Context, pa: &PodAllocation, ev: &PlannedEvent) {
    let pod_ref = ObjectReference {
        api_version: Some("v1".to_owned()),
        kind: Some("Pod".to_owned()),
        name: Some(pa.spec.pod_name.clone()),
        namespace: pa.namespace(),
        uid: Some(pa.spec.pod_uid.clone()),
        ..Default::default()
    };
    let event = Event {
        type_: if ev.warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: ev.reason.to_owned(),
        note: Some(ev.note.chars().take(1000).collect()),
        action: "Resize".to_owned(),
        secondary: Some(pa.object_ref(&())),
    };
    if let Err(e) = ctx.recorder.publish(&event, &pod_ref).await {
        // Events are best effort: the status holds the record.
        tracing::warn!(pod = ?pod_ref.name, error = %e, reason = ev.reason, "could not publish event");
    }
}

/// One reconcile of one PodAllocation.
pub async fn reconcile(pa: Arc<PodAllocation>, ctx: Arc<Context>) -> Result<Action, ResizeError> {
    let ns = pa.namespace().ok_or(ResizeError::NoNamespace)?;
    let name = pa.name_any();
    let key = ObjectRef::from_obj(pa.as_ref());
    if pa.metadata.deletion_timestamp.is_some() {
        ctx.forget(&key);
        return Ok(Action::await_change());
    }
    let pas: Api<PodAllocation> = Api::namespaced(ctx.client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let pod_obj = ctx.pods.get(&ObjectRef::new(&pa.spec.pod_name).within(&ns));
    let facts = pod_obj
        .as_deref()
        .map(|p| PodFacts::from_pod(p).map_err(|e| e.to_string()));
    let mut mem = ctx.memory(&key, &pa.spec.pod_uid);
    let now = ctx.now();
    let plan = plan(
        &pa,
        facts.as_ref().map(|r| r.as_ref().map_err(Clone::clone)),
        &ctx.cfg,
        &mem,
        now,
        Timestamp::now(),
    );
    tracing::debug!(
        allocation = %key,
        generation = ?pa.metadata.generation,
        want = %pa.spec.cpu_limit.millis(),
        pod_version = ?pod_obj.as_ref().and_then(|p| p.metadata.resource_version.clone()),
        pod_limits = ?facts.as_ref().and_then(|r| r.as_ref().ok()).map(|f| f.containers.iter().map(|c| (c.limit, c.status_limit)).collect::<Vec<_>>()),
        phase = %plan.status.phase,
        reason = ?plan.status.reason,
        resize = ?plan.resize,
        "reconcile"
    );
    // What the server holds (updated below when this reconcile writes it).
    let mut old = pa.status.clone().unwrap_or_default();
    let mut status = plan.status.clone();
    // This reconcile wrote the status before its resize (the event goes with
    // the status, below).
    let mut wrote_first = false;
    if let Some(changes) = &plan.resize {
        let adopting = plan
            .event
            .as_ref()
            .is_some_and(|e| e.reason == EVENT_OPERATOR_CHANGE);
        if (pa.originals().is_empty() && mem.original.is_none()) || adopting {
            // The original limits are on record before anything changes (with
            // the request this status announces; a refusal overwrites it).
            // The node daemon puts them in the spec; an allocation written by
            // anyone else may lack them. An operator's limits adopted as the
            // original are too: once this resize owns the limit, the pod's
            // managed fields no longer show the operator's.
            write_status(&pas, &name, &status).await?;
            wrote_first = true;
            old = status.clone();
            mem.original = Some(status.original.clone());
            mem.written = Some(status.clone());
            ctx.remember(key.clone(), mem.clone());
        }
        match patch_resize(&pods, &pa.spec.pod_name, changes).await {
            Ok(_) => {
                mem.last_change = Some(now);
                mem.patched = Some(changes.clone());
                mem.requested_at = Some(now);
                mem.failures = 0;
                mem.retry_at = None;
                if let Some(m) = &ctx.metrics {
                    m.inc_resize("requested");
                }
                mem.early = write_early(&ctx, &pa, changes);
            }
            Err(e) if is_refusal(&e) => {
                mem.failures += 1;
                let wait = ctx.cfg.backoff(mem.failures);
                mem.retry_at = Some(now + wait);
                let ev = rejected(&mut status, &e);
                if let Some(m) = &ctx.metrics {
                    m.inc_resize("rejected");
                }
                tracing::warn!(pod = %format!("{ns}/{}", pa.spec.pod_name), error = %ev.note, retry_in = ?wait, "resize refused");
                ctx.remember(key, mem);
                record(&ctx, &pas, &pa, &old, &status, Some(&ev)).await?;
                return Ok(Action::requeue(wait));
            }
            Err(source) => {
                mem.failures += 1;
                mem.retry_at = Some(now + ctx.cfg.backoff(mem.failures));
                ctx.remember(key, mem);
                if let Some(m) = &ctx.metrics {
                    m.inc_resize("error");
                }
                return Err(ResizeError::Resize {
                    name: format!("{ns}/{}", pa.spec.pod_name),
                    source,
                });
            }
        }
    }
    if status.phase == Phase::Applied {
        // The kubelet wrote the same quotas.
        mem.early = None;
        let requested_at = mem.requested_at.take();
        if let (Some(at), Some(m)) = (requested_at, &ctx.metrics) {
            m.observe_resize_latency(now.saturating_sub(at));
            m.inc_resize("applied");
        }
        if requested_at.is_some() {
            reassert_weight(
                &ctx,
                &pa.spec.pod_uid,
                &format!("{ns}/{}", pa.spec.pod_name),
            );
        }
        mem.failures = 0;
        mem.retry_at = None;
    }
    let mut event = plan.event.as_ref();
    if mem
        .written
        .as_ref()
        .is_some_and(|w| same_record(w, &status))
    {
        // Already on the server: this copy of the allocation is older than
        // the controller's own last write (and its event was published with
        // it, unless that write was this reconcile's own, before its resize).
        old = status.clone();
        if !wrote_first {
            event = None;
        }
    }
    if let Some(m) = &ctx.metrics {
        if event.is_some_and(|e| e.reason == EVENT_OPERATOR_CHANGE) {
            m.inc_resize("operator_change");
        }
        // The kubelet's verdicts, counted when they are news.
        if status.reason != old.reason
            && let Some(verdict) = status.reason.as_deref().and_then(kubelet_verdict_code)
        {
            m.inc_resize(verdict);
        }
    }
    if status
        .reason
        .as_deref()
        .and_then(kubelet_verdict_code)
        .is_some()
        && let Some(written) = mem.early.take()
    {
        // The kubelet did not carry the resize out: the kernel gets back what
        // the kubelet applied.
        let n = early::revert(&written);
        tracing::info!(pod = %format!("{ns}/{}", pa.spec.pod_name), reason = ?status.reason, cgroups = n, "early quota put back");
        if let Some(m) = &ctx.metrics {
            m.inc_resize("early_quota_reverted");
        }
    }
    ctx.remember(key.clone(), mem.clone());
    if !plan.quiet && record(&ctx, &pas, &pa, &old, &status, event).await? {
        mem.written = Some(status);
        ctx.remember(key, mem);
    }
    Ok(plan
        .requeue
        .map_or_else(Action::await_change, Action::requeue))
}

/// The `mbcas_resizes_total` result of a status reason that is the kubelet's
/// verdict on a resize.
fn kubelet_verdict_code(reason: &str) -> Option<&'static str> {
    match reason {
        "Infeasible" => Some("kubelet_infeasible"),
        "ResizeDeferred" => Some("kubelet_deferred"),
        "ResizeError" => Some("kubelet_error"),
        _ => None,
    }
}

/// Marks the status of a resize the API server refused; the event to publish.
fn rejected(status: &mut PodAllocationStatus, e: &kube::Error) -> PlannedEvent {
    let msg = match e {
        kube::Error::Api(s) => s.message.clone(),
        other => other.to_string(),
    };
    let message = format!("the API server refused the resize: {msg}");
    status.phase = Phase::Failed;
    status.reason = Some("ResizeRejected".to_owned());
    status.message = Some(message.clone());
    for c in &mut status.conditions {
        c.status = "False".to_owned();
        c.reason = "ResizeRejected".to_owned();
        c.message = message.clone();
    }
    PlannedEvent {
        warning: true,
        reason: "ResizeFailed",
        note: format!("resize refused: {msg}"),
    }
}

/// Writes the status when it differs from what the server holds, then
/// publishes the event.
async fn record(
    ctx: &Context,
    pas: &Api<PodAllocation>,
    pa: &PodAllocation,
    old: &PodAllocationStatus,
    status: &PodAllocationStatus,
    event: Option<&PlannedEvent>,
) -> Result<bool, ResizeError> {
    let write = status != old;
    if write {
        write_status(pas, &pa.name_any(), status).await?;
    }
    if let Some(ev) = event {
        publish(ctx, pa, ev).await;
    }
    Ok(write)
}

/// Writes the raised quotas of an accepted resize into the pod's cgroups
/// Writes a held pod's lowered weight back after the kubelet reset it.
fn reassert_weight(ctx: &Context, uid: &str, pod: &str) {
    let Some(book) = &ctx.weights else {
        return;
    };
    match book.reassert_weight(uid) {
        Ok(Some(weight)) => {
            tracing::debug!(%pod, weight, "lowered weight put back after the kubelet's resize");
            if let Some(m) = &ctx.metrics {
                m.inc_weight_write("relowered");
            }
        }
        Ok(None) | Err(CgroupFsError::Vanished { .. }) => {}
        Err(e) => {
            tracing::warn!(%pod, error = %error_chain(&e), "cannot put the lowered weight back");
            if let Some(m) = &ctx.metrics {
                m.inc_weight_write("failed");
            }
        }
    }
}

/// when the controller has them ([`early`]); what it wrote.
fn write_early(
    ctx: &Context,
    pa: &PodAllocation,
    changes: &[(String, MilliCpu)],
) -> Option<Vec<early::Written>> {
    let cgroups = ctx.early.as_ref()?.get(&pa.spec.pod_uid)?;
    match early::raise(&cgroups, changes) {
        Ok(written) if written.is_empty() => None,
        Ok(written) => {
            tracing::debug!(pod = %pa.spec.pod_name, cgroups = written.len(), "increase written ahead of the kubelet");
            if let Some(m) = &ctx.metrics {
                m.inc_resize("early_quota");
            }
            Some(written)
        }
        Err(e) => {
            tracing::warn!(pod = %pa.spec.pod_name, error = %crate::error::error_chain(&e), "could not write the increase ahead of the kubelet; it waits for the kubelet");
            if let Some(m) = &ctx.metrics {
                m.inc_resize("early_quota_failed");
            }
            None
        }
    }
}

/// Transient failures wait at least the configured failure backoff (1 min);
/// an allocation deleted meanwhile is not retried.
pub fn error_policy(pa: Arc<PodAllocation>, err: &ResizeError, ctx: Arc<Context>) -> Action {
    let key = ObjectRef::from_obj(pa.as_ref());
    if err.gone() {
        // Deleted with its pod while the reconcile ran (the node's pod churn):
        // nothing to retry, the deletion reaches the controller.
        tracing::debug!(allocation = %key, error = %crate::error::error_chain(err), "allocation gone");
        return Action::await_change();
    }
    let mem = ctx.memory(&key, &pa.spec.pod_uid);
    let wait = ctx.cfg.backoff(mem.failures.max(1));
    tracing::warn!(allocation = %key, error = %crate::error::error_chain(err), retry_in = ?wait, "reconcile failed");
    Action::requeue(wait)
}

/// Runs the controller until `shutdown`; `pod_events` is the node's pod stream
/// (shared with the pod index).
pub async fn run(
    ctx: Arc<Context>,
    pod_events: impl futures::Stream<Item = Arc<Pod>> + Send + 'static,
    shutdown: CancellationToken,
) {
    let api: Api<PodAllocation> = Api::all(ctx.client.clone());
    let cfg = watcher::Config::default().labels(&format!("{NODE_LABEL}={}", ctx.cfg.node_name));
    let stop = shutdown.clone();
    Controller::new(api, cfg)
        .watches_shared_stream(pod_events, |pod: Arc<Pod>| {
            // The PodAllocation of a pod has the pod's name and namespace.
            pod.namespace()
                .map(|ns| ObjectRef::<PodAllocation>::new(&pod.name_any()).within(&ns))
        })
        .graceful_shutdown_on(async move { stop.cancelled().await })
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            match res {
                Ok((obj, _)) => tracing::debug!(allocation = %obj, "reconciled"),
                Err(e) => tracing::debug!(error = %crate::error::error_chain(&e), "controller"),
            }
        })
        .await;
}

#[cfg(test)]
mod tests;
