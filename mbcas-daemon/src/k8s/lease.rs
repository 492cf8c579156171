//! One daemon per node: a `coordination.k8s.io/v1` Lease named
//! `mbcas-node-<node>` that a daemon holds before its controller or decision
//! loop may write anything.
//!
//! Two copies of the daemon on one node (a rolling update with surge, a copy
//! started by hand) would otherwise apply with the same field manager and
//! force, and two engines would flip each other's limits. The second copy
//! watches (it is ready, so a surge update can proceed) but neither decides nor
//! writes until the lease is free: released by a holder that stops cleanly, or
//! not renewed for the lease's duration by one that died.
//!
//! Expiry is judged by the waiting daemon's own clock, from when it last saw
//! the lease change (its `resourceVersion`), never by comparing `renewTime`
//! with its clock: node clocks drift. Every write carries the
//! `resourceVersion` it read, so two daemons racing for a free lease cannot
//! both win (the loser gets 409 Conflict). The holder stops (the process
//! exits, and the DaemonSet restarts it as a waiting copy) when the lease is
//! taken from it or when it could not renew for ¾ of the duration: before any
//! waiting copy can judge the lease expired.

use std::time::{Duration, Instant};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{Api, Client, api::PostParams};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// The Lease that guards `node`.
pub fn lease_name(node: &str) -> String {
    format!("mbcas-node-{node}")
}

/// An identity unique to this process and this call: the pod's name when the
/// DaemonSet passes it, else the host name, the process id and the time (two
/// daemons in one process, as in the tests, differ by the time).
pub fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown-host".to_owned());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{host}-{}-{nanos:x}", std::process::id())
}

/// What one attempt to take or renew the lease found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// This daemon holds the lease (taken or renewed now).
    Held,
    /// Another daemon holds it and it has not expired.
    HeldBy(String),
}

/// The node's lease and what this daemon has seen of it.
#[derive(Clone)]
pub struct NodeLease {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
    /// The lease's `resourceVersion` when this daemon last saw it change, and
    /// when (its own clock).
    observed: Option<(String, Instant)>,
}

impl std::fmt::Debug for NodeLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeLease")
            .field("name", &self.name)
            .field("identity", &self.identity)
            .field("duration", &self.duration)
            .finish_non_exhaustive()
    }
}

impl NodeLease {
    pub fn new(
        client: Client,
        namespace: &str,
        node: &str,
        identity: String,
        duration: Duration,
    ) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: lease_name(node),
            identity,
            duration,
            observed: None,
        }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    fn duration_seconds(&self) -> i32 {
        i32::try_from(self.duration.as_secs().max(1)).unwrap_or(i32::MAX)
    }

    /// Takes the lease if it is free or expired, renews it if this daemon
    /// holds it. A conflict (another daemon wrote first) is `HeldBy`.
    pub async fn try_acquire_or_renew(&mut self) -> Result<Attempt, kube::Error> {
        let now = MicroTime(Timestamp::now());
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    labels: Some(
                        [("app.kubernetes.io/part-of".to_owned(), "mbcas".to_owned())].into(),
                    ),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(self.duration_seconds()),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(Attempt::Held),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(Attempt::HeldBy(
                    "another daemon (it created the lease first)".to_owned(),
                )),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let version = lease.metadata.resource_version.clone().unwrap_or_default();
        match holder {
            Some(h) if h == self.identity => {
                spec.renew_time = Some(now);
                spec.lease_duration_seconds = Some(self.duration_seconds());
            }
            Some(h) => {
                // Expired only when it has not changed for its whole duration,
                // by this daemon's clock since it first saw this version.
                let seen = match &self.observed {
                    Some((v, at)) if *v == version => *at,
                    _ => {
                        self.observed = Some((version, Instant::now()));
                        return Ok(Attempt::HeldBy(h));
                    }
                };
                let theirs = spec
                    .lease_duration_seconds
                    .and_then(|s| u64::try_from(s).ok())
                    .map_or(self.duration, Duration::from_secs);
                if seen.elapsed() < theirs {
                    return Ok(Attempt::HeldBy(h));
                }
                tracing::warn!(holder = %h, lease = %self.name, "the node lease expired (not renewed for {theirs:?}); taking it");
                self.take(spec, now);
            }
            None => self.take(spec, now),
        }
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(Attempt::Held),
            Err(kube::Error::Api(s)) if s.code == 409 => {
                self.observed = None;
                Ok(Attempt::HeldBy(
                    "another daemon (it wrote the lease first)".to_owned(),
                ))
            }
            Err(e) => Err(e),
        }
    }

    fn take(&self, spec: &mut LeaseSpec, now: MicroTime) {
        spec.holder_identity = Some(self.identity.clone());
        spec.lease_duration_seconds = Some(self.duration_seconds());
        spec.acquire_time = Some(now.clone());
        spec.renew_time = Some(now);
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
    }

    /// Gives the lease up if this daemon holds it, so a waiting copy takes it
    /// at once rather than after the duration.
    pub async fn release(&self) -> Result<(), kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.renew_time = None;
        self.api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
            .map(drop)
    }

    /// How often the holder renews and a waiting daemon looks again.
    fn renew_every(&self) -> Duration {
        (self.duration / 4).max(Duration::from_millis(500))
    }

    /// Waits until this daemon holds the lease (then cancels `held`), and
    /// renews it until `shutdown`. Returns an error when the lease is lost:
    /// taken by another daemon, or not renewed for ¾ of its duration (the
    /// API server unreachable); the daemon must then stop writing.
    pub async fn hold(
        mut self,
        held: CancellationToken,
        shutdown: CancellationToken,
        metrics: Metrics,
    ) -> Result<(), String> {
        let every = self.renew_every();
        let mut waiting_on = None;
        loop {
            match self.try_acquire_or_renew().await {
                Ok(Attempt::Held) => break,
                Ok(Attempt::HeldBy(h)) => {
                    if waiting_on.as_ref() != Some(&h) {
                        tracing::info!(holder = %h, lease = %self.name, "another daemon holds this node's lease; waiting (watching, not deciding or writing)");
                        waiting_on = Some(h);
                    }
                }
                Err(e) => {
                    tracing::warn!(lease = %self.name, error = %crate::error::error_chain(&e), "cannot read or take the node lease; retrying");
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = tokio::time::sleep(every) => {}
            }
        }
        tracing::info!(lease = %self.name, identity = %self.identity, "holding this node's lease");
        metrics.set_node_lease_held(true);
        held.cancel();
        let deadline = self.duration * 3 / 4;
        let mut renewed = Instant::now();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = tokio::time::sleep(every) => {}
            }
            match self.try_acquire_or_renew().await {
                Ok(Attempt::Held) => renewed = Instant::now(),
                Ok(Attempt::HeldBy(h)) => {
                    metrics.set_node_lease_held(false);
                    return Err(format!("lost the node lease {} to {h}", self.name));
                }
                Err(e) if renewed.elapsed() >= deadline => {
                    metrics.set_node_lease_held(false);
                    return Err(format!(
                        "could not renew the node lease {} for {:?}: {}",
                        self.name,
                        renewed.elapsed(),
                        crate::error::error_chain(&e)
                    ));
                }
                Err(e) => {
                    tracing::warn!(lease = %self.name, error = %crate::error::error_chain(&e), "renewing the node lease failed; retrying");
                }
            }
        }
    }
}
