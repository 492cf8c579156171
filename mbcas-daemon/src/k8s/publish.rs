//! The writer: turns decisions into PodAllocations (server-side apply, field
//! manager `mbcas-daemon`) and removes those whose pod is gone.
//!
//! A PodAllocation is written only when the decided limit differs from what the
//! stored one already asks (the policy's hysteresis has been applied before), so
//! a node with constant loads makes no API writes.

use std::collections::BTreeMap;

use k8s_openapi::{api::core::v1::Pod, apimachinery::pkg::apis::meta::v1::OwnerReference};
use kube::{
    Api, Client, ResourceExt as _,
    api::{DeleteParams, Patch, PatchParams, Preconditions},
    runtime::reflector::{ObjectRef, Store},
};

use super::crd::{
    ContainerAllocation, CpuQuantity, FIELD_MANAGER, NODE_LABEL, OriginalLimit, PodAllocation,
    PodAllocationSpec,
};
use super::pods::PodFacts;
use crate::{market::split_to_containers, units::MilliCpu};

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("writing PodAllocation {namespace}/{name}")]
    Apply {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("deleting PodAllocation {namespace}/{name}")]
    Delete {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("serialising PodAllocation {name}")]
    Serialise {
        name: String,
        #[source]
        source: serde_json::Error,
    },
}

/// Why a pod's limit is what it is, for the PodAllocation's spec.
#[derive(Clone, Debug, PartialEq)]
pub struct Why {
    pub demand: MilliCpu,
    pub weight: f64,
    pub price: f64,
    pub reason: &'static str,
}

/// The lowest limit a container is split: the kernel's smallest CFS quota
/// (1 ms per 100 ms period), also for a container that requests nothing.
pub const MIN_CONTAINER_LIMIT: MilliCpu = MilliCpu(10);

/// The PodAllocation for `pod` at total limit `total`, split over its
/// containers in proportion to their current limits (see
/// [`allocation_split`]).
pub fn allocation_for(
    pod: &PodFacts,
    stored: Option<&PodAllocation>,
    node: &str,
    total: MilliCpu,
    why: &Why,
) -> PodAllocation {
    allocation_split(pod, stored, node, total, why, &BTreeMap::new())
}

/// The PodAllocation for `pod` at total limit `total`, split over its
/// containers in proportion to their measured needs (`needs`, by container
/// name: what each container's cgroup used and was throttled), or to
/// their current limits when a container's need is not known; never below a
/// container's request (nor [`MIN_CONTAINER_LIMIT`]). `stored` is this pod's
/// allocation as the API server has it: its original limits are kept; without
/// one (or for an earlier pod of the same name) the pod's limits now are the
/// originals, since no resize happens before an allocation asks for it.
pub fn allocation_split(
    pod: &PodFacts,
    stored: Option<&PodAllocation>,
    node: &str,
    total: MilliCpu,
    why: &Why,
    needs: &BTreeMap<String, MilliCpu>,
) -> PodAllocation {
    let original = match stored.filter(|s| s.spec.pod_uid == pod.uid) {
        Some(s) if !s.originals().is_empty() => s.originals().to_vec(),
        _ => pod
            .containers
            .iter()
            .map(|c| OriginalLimit {
                name: c.name.clone(),
                cpu_limit: c.limit.map(CpuQuantity),
            })
            .collect(),
    };
    let measured: Option<Vec<MilliCpu>> = pod
        .containers
        .iter()
        .map(|c| needs.get(&c.name).copied())
        .collect();
    let needs = measured.unwrap_or_else(|| {
        pod.containers
            .iter()
            .map(|c| c.limit.unwrap_or(c.request))
            .collect()
    });
    let floors: Vec<MilliCpu> = pod
        .containers
        .iter()
        .map(|c| c.request.max(MIN_CONTAINER_LIMIT))
        .collect();
    let parts = split_to_containers(total, &needs, &floors);
    let containers: Vec<ContainerAllocation> = pod
        .containers
        .iter()
        .zip(&parts)
        .map(|(c, &m)| ContainerAllocation {
            name: c.name.clone(),
            cpu_limit: CpuQuantity(m),
        })
        .collect();
    let sum = MilliCpu(parts.iter().map(|m| m.get()).sum());
    let mut pa = PodAllocation::new(
        &pod.name,
        PodAllocationSpec {
            pod_name: pod.name.clone(),
            pod_uid: pod.uid.clone(),
            node_name: node.to_owned(),
            cpu_limit: CpuQuantity(sum),
            containers,
            demand: CpuQuantity(why.demand),
            // Millicores of request → cores, to the millicore.
            weight: why.weight.round() / 1000.0,
            price: if why.price.is_finite() {
                (why.price * 1000.0).round() / 1000.0
            } else {
                0.0
            },
            reason: why.reason.to_owned(),
            original,
        },
    );
    pa.metadata.namespace = Some(pod.namespace.clone());
    pa.metadata.labels = Some([(NODE_LABEL.to_owned(), node.to_owned())].into());
    pa.metadata.owner_references = Some(vec![OwnerReference {
        api_version: "v1".to_owned(),
        kind: "Pod".to_owned(),
        name: pod.name.clone(),
        uid: pod.uid.clone(),
        controller: Some(false),
        block_owner_deletion: None,
    }]);
    pa
}

/// Whether the stored PodAllocation already asks for what `wanted` asks.
pub fn up_to_date(stored: Option<&PodAllocation>, wanted: &PodAllocation) -> bool {
    stored.is_some_and(|s| {
        s.spec.pod_uid == wanted.spec.pod_uid
            && s.spec.containers == wanted.spec.containers
            && s.labels().get(NODE_LABEL) == wanted.labels().get(NODE_LABEL)
    })
}

/// Writes PodAllocations for this node.
pub struct Writer {
    client: Client,
    node: String,
    /// This node's PodAllocations as the API server has them.
    allocations: Store<PodAllocation>,
}

impl Writer {
    pub fn new(client: Client, node: impl Into<String>, allocations: Store<PodAllocation>) -> Self {
        Self {
            client,
            node: node.into(),
            allocations,
        }
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn stored(&self, namespace: &str, name: &str) -> Option<std::sync::Arc<PodAllocation>> {
        self.allocations
            .get(&ObjectRef::new(name).within(namespace))
    }

    /// Server-side applies `pa` unless the stored one already says the same.
    /// Returns whether a write was made.
    pub async fn publish(&self, pa: &PodAllocation) -> Result<bool, PublishError> {
        let ns = pa.namespace().unwrap_or_default();
        let name = pa.name_any();
        if up_to_date(self.stored(&ns, &name).as_deref(), pa) {
            return Ok(false);
        }
        let api: Api<PodAllocation> = Api::namespaced(self.client.clone(), &ns);
        let mut body = serde_json::to_value(pa).map_err(|source| PublishError::Serialise {
            name: name.clone(),
            source,
        })?;
        if let Some(obj) = body.as_object_mut() {
            // The writer owns the spec and metadata; the status is the controller's.
            obj.remove("status");
        }
        api.patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await
        .map_err(|source| PublishError::Apply {
            namespace: ns,
            name,
            source,
        })?;
        Ok(true)
    }

    /// Deletes this node's PodAllocations whose pod is gone or was replaced
    /// (a new UID under the same name). `pods` must be synced. Returns how many
    /// were deleted.
    pub async fn collect_garbage(&self, pods: &Store<Pod>) -> Result<usize, PublishError> {
        let mut deleted = 0;
        for pa in self.allocations.state() {
            let ns = pa.namespace().unwrap_or_default();
            let alive = pods
                .get(&ObjectRef::new(&pa.spec.pod_name).within(&ns))
                .is_some_and(|p| p.metadata.uid.as_deref() == Some(pa.spec.pod_uid.as_str()));
            if alive || pa.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let api: Api<PodAllocation> = Api::namespaced(self.client.clone(), &ns);
            let dp = DeleteParams {
                preconditions: Some(Preconditions {
                    uid: pa.metadata.uid.clone(),
                    resource_version: None,
                }),
                ..DeleteParams::default()
            };
            match api.delete(&pa.name_any(), &dp).await {
                Ok(_) => deleted += 1,
                // Already gone, or replaced by a newer one: nothing to do.
                Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
                Err(source) => {
                    return Err(PublishError::Delete {
                        namespace: ns,
                        name: pa.name_any(),
                        source,
                    });
                }
            }
        }
        Ok(deleted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::pods::ContainerFacts;

    fn pod() -> PodFacts {
        PodFacts::burstable(
            "u1",
            "shop",
            vec![
                ContainerFacts::limited("app", 200, 600),
                ContainerFacts::limited("side", 100, 200),
            ],
        )
    }

    fn why() -> Why {
        Why {
            demand: MilliCpu(900),
            weight: 300.0,
            price: 2.5,
            reason: "increase_throttled",
        }
    }

    #[test]
    fn allocation_is_split_owned_and_labelled() {
        let pa = allocation_for(&pod(), None, "n1", MilliCpu(1200), &why());
        assert_eq!(pa.name_any(), "web");
        assert_eq!(pa.namespace().as_deref(), Some("shop"));
        assert_eq!(pa.labels().get(NODE_LABEL).map(String::as_str), Some("n1"));
        let owner = &pa.owner_references()[0];
        assert_eq!((owner.kind.as_str(), owner.uid.as_str()), ("Pod", "u1"));
        let parts: Vec<u64> = pa
            .spec
            .containers
            .iter()
            .map(|c| c.cpu_limit.millis().get())
            .collect();
        assert_eq!(parts.iter().sum::<u64>(), 1200);
        assert_eq!(pa.spec.cpu_limit.millis(), MilliCpu(1200));
        assert!(parts[0] >= 200 && parts[1] >= 100, "{parts:?}");
        // In proportion to the current limits (600:200).
        assert_eq!(parts, vec![900, 300]);
    }

    fn split(pa: &PodAllocation) -> Vec<u64> {
        pa.spec
            .containers
            .iter()
            .map(|c| c.cpu_limit.millis().get())
            .collect()
    }

    #[test]
    fn a_measured_split_follows_the_containers_needs() {
        // `app` wants 950 m (throttled at 600), the sidecar uses 5 m: `app`
        // gets what its need asks, the sidecar its request, not a third.
        let needs = BTreeMap::from([
            ("app".to_owned(), MilliCpu(950)),
            ("side".to_owned(), MilliCpu(5)),
        ]);
        let pa = allocation_split(&pod(), None, "n1", MilliCpu(1200), &why(), &needs);
        assert_eq!(split(&pa), vec![1100, 100]);
        // A need that is not known for every container: current limits.
        let partial = BTreeMap::from([("app".to_owned(), MilliCpu(950))]);
        let pa = allocation_split(&pod(), None, "n1", MilliCpu(1200), &why(), &partial);
        assert_eq!(split(&pa), vec![900, 300]);
        // A container that requests nothing and needs nothing still gets the
        // kernel's smallest quota, never a limit of 0.
        let mut free = pod();
        free.containers[1].request = MilliCpu(0);
        let idle = BTreeMap::from([
            ("app".to_owned(), MilliCpu(400)),
            ("side".to_owned(), MilliCpu(0)),
        ]);
        let pa = allocation_split(&free, None, "n1", MilliCpu(500), &why(), &idle);
        assert_eq!(split(&pa), vec![490, 10]);
    }

    #[test]
    fn the_original_limits_go_into_the_spec_once_and_are_kept() {
        let lim = |name: &str, m: u64| OriginalLimit {
            name: name.into(),
            cpu_limit: Some(CpuQuantity(MilliCpu(m))),
        };
        // First allocation: the pod's limits now (600m, 200m) are the originals.
        let first = allocation_for(&pod(), None, "n1", MilliCpu(1200), &why());
        assert_eq!(first.spec.original, vec![lim("app", 600), lim("side", 200)]);
        // Later, the pod runs at MBCAS's limits: the stored originals are kept.
        let mut resized = pod();
        resized.containers[0].limit = Some(MilliCpu(900));
        let later = allocation_for(&resized, Some(&first), "n1", MilliCpu(1500), &why());
        assert_eq!(later.spec.original, first.spec.original);
        // An allocation of an older daemon, originals in its status only.
        let mut old = first.clone();
        old.spec.original.clear();
        old.status = Some(crate::k8s::crd::PodAllocationStatus {
            original: vec![lim("app", 500), lim("side", 200)],
            ..Default::default()
        });
        let later = allocation_for(&resized, Some(&old), "n1", MilliCpu(1500), &why());
        assert_eq!(later.spec.original, vec![lim("app", 500), lim("side", 200)]);
        // The stored allocation of an earlier pod of the same name is not this pod's.
        let mut replaced = resized.clone();
        replaced.uid = "u2".into();
        let fresh = allocation_for(&replaced, Some(&first), "n1", MilliCpu(1500), &why());
        assert_eq!(fresh.spec.original, vec![lim("app", 900), lim("side", 200)]);
    }

    #[test]
    fn below_the_requests_each_container_keeps_its_request() {
        let pa = allocation_for(&pod(), None, "n1", MilliCpu(100), &why());
        let parts: Vec<u64> = pa
            .spec
            .containers
            .iter()
            .map(|c| c.cpu_limit.millis().get())
            .collect();
        assert_eq!(parts, vec![200, 100]);
        assert_eq!(pa.spec.cpu_limit.millis(), MilliCpu(300));
    }

    #[test]
    fn unchanged_allocations_are_not_rewritten() {
        let a = allocation_for(&pod(), None, "n1", MilliCpu(1200), &why());
        // Only the limits matter: a new price or demand alone is not worth a write.
        let mut other_why = why();
        other_why.price = 9.0;
        other_why.demand = MilliCpu(1);
        let b = allocation_for(&pod(), None, "n1", MilliCpu(1200), &other_why);
        assert!(up_to_date(Some(&a), &b));
        let c = allocation_for(&pod(), None, "n1", MilliCpu(1300), &why());
        assert!(!up_to_date(Some(&a), &c));
        assert!(!up_to_date(None, &a));
        let mut replaced = pod();
        replaced.uid = "u2".into();
        let d = allocation_for(&replaced, None, "n1", MilliCpu(1200), &why());
        assert!(!up_to_date(Some(&a), &d));
    }
}
