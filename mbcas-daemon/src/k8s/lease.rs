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
//! taken from it or when it could not renew it for half the duration (each
//! attempt bounded by the renewal interval: the client's own read timeout is
//! minutes): before any waiting copy can judge the lease expired.

use std::time::Duration;

use tokio::time::Instant;

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

/// Why an attempt failed: the API server's answer, or none in time.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error(transparent)]
    Api(#[from] kube::Error),
    #[error("no answer from the API server within {0:?}")]
    Timeout(Duration),
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

    /// One attempt, given at most one renewal interval: a request the API
    /// server leaves hanging (the client's own read timeout is minutes) must
    /// not keep a holder believing it holds a lease that expired.
    async fn attempt(&mut self) -> Result<Attempt, LeaseError> {
        let limit = self.renew_every();
        match tokio::time::timeout(limit, self.try_acquire_or_renew()).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(LeaseError::Timeout(limit)),
        }
    }

    /// Waits until this daemon holds the lease (then cancels `held`), and
    /// renews it until `shutdown`. Returns an error when the lease is lost:
    /// taken by another daemon, or not renewed for half its duration (the
    /// API server unreachable or not answering); the daemon must then stop
    /// writing.
    pub async fn hold(
        mut self,
        held: CancellationToken,
        shutdown: CancellationToken,
        metrics: Metrics,
    ) -> Result<(), String> {
        let every = self.renew_every();
        let mut waiting_on = None;
        loop {
            match self.attempt().await {
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
        // Half the duration: a waiting copy judges the lease expired no
        // sooner than the whole duration after the last renewal it saw, and
        // one attempt takes at most one interval.
        let deadline = self.duration / 2;
        let mut renewed = Instant::now();
        let mut failure = String::new();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = tokio::time::sleep(every) => {}
            }
            if renewed.elapsed() >= deadline {
                metrics.set_node_lease_held(false);
                return Err(format!(
                    "could not renew the node lease {} for {:?}: {failure}",
                    self.name,
                    renewed.elapsed()
                ));
            }
            match self.attempt().await {
                Ok(Attempt::Held) => renewed = Instant::now(),
                Ok(Attempt::HeldBy(h)) => {
                    metrics.set_node_lease_held(false);
                    return Err(format!("lost the node lease {} to {h}", self.name));
                }
                Err(e) => {
                    failure = crate::error::error_chain(&e);
                    tracing::warn!(lease = %self.name, error = %failure, "renewing the node lease failed; retrying");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use http::{Request, Response, StatusCode};
    use kube::client::Body;

    use super::*;

    fn lease_json(holder: &str, version: &str) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "mbcas-node-n1", "namespace": "ns", "resourceVersion": version},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": 2}
        }))
        .unwrap_or_default()
    }

    fn not_found() -> Body {
        Body::from(
            serde_json::to_vec(&serde_json::json!({
                "kind": "Status", "apiVersion": "v1", "status": "Failure",
                "reason": "NotFound", "code": 404, "message": "not found"
            }))
            .unwrap_or_default(),
        )
    }

    /// What the mock API server does with each request ("METHOD" seen).
    type Seen = Arc<Mutex<Vec<String>>>;

    /// `GET` answers `get(n)` for the n-th GET (`None`: 404; `Some(None)`:
    /// never answers); `POST`/`PUT` succeed and echo this daemon as holder.
    fn server<F>(get: F) -> (Client, Seen)
    where
        F: Fn(usize) -> Option<Option<Vec<u8>>> + Send + 'static,
    {
        let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let seen: Seen = Arc::default();
        let rec = seen.clone();
        tokio::spawn(async move {
            let mut gets = 0;
            // Requests left unanswered stay here (dropping one would answer
            // it with an error).
            let mut hanging = Vec::new();
            while let Some((req, send)) = handle.next_request().await {
                let method = req.method().to_string();
                if let Ok(mut s) = rec.lock() {
                    s.push(method.clone());
                }
                let resp = match method.as_str() {
                    "GET" => {
                        gets += 1;
                        match get(gets) {
                            None => Response::builder()
                                .status(StatusCode::NOT_FOUND)
                                .body(not_found()),
                            Some(Some(body)) => Response::builder().body(Body::from(body)),
                            Some(None) => {
                                hanging.push(send);
                                continue;
                            }
                        }
                    }
                    _ => Response::builder()
                        .status(StatusCode::CREATED)
                        .body(Body::from(lease_json("me", "9"))),
                };
                if let Ok(r) = resp {
                    send.send_response(r);
                }
            }
        });
        (Client::new(svc, "ns"), seen)
    }

    fn lease(client: Client) -> NodeLease {
        NodeLease::new(client, "ns", "n1", "me".to_owned(), Duration::from_secs(2))
    }

    /// A holder whose API server stops answering gives the lease up (its
    /// daemon stops writing) within half the duration after its last renewal,
    /// before a waiting copy (which waits the whole duration) can take it.
    #[tokio::test(start_paused = true)]
    async fn a_holder_that_cannot_renew_gives_up_before_the_lease_expires() {
        // The first GET: no lease (it is created); every later GET hangs.
        let (client, seen) = server(|n| if n == 1 { None } else { Some(None) });
        let (held, shutdown) = (CancellationToken::new(), CancellationToken::new());
        let task = tokio::spawn(lease(client).hold(held.clone(), shutdown, Metrics::new()));
        held.cancelled().await;
        let since = Instant::now();
        let ended = task.await.unwrap_or(Ok(()));
        let Err(why) = ended else {
            panic!("the holder kept the lease it could not renew")
        };
        assert!(why.contains("could not renew"), "{why}");
        assert!(
            since.elapsed() < Duration::from_secs(2),
            "gave up after {:?}, not before the 2 s lease could expire",
            since.elapsed()
        );
        let seen = seen.lock().map(|s| s.clone()).unwrap_or_default();
        assert_eq!(seen[..2], ["GET".to_owned(), "POST".to_owned()], "{seen:?}");
    }

    /// A lease held by another copy is taken only once it has not changed
    /// for its whole duration, by this daemon's clock; a renewal (a new
    /// resourceVersion) starts the wait again.
    #[tokio::test(start_paused = true)]
    async fn an_expired_lease_is_taken_and_a_renewed_one_is_not() {
        // GETs 1–2 see version 1, then version 2 (renewed once, then no more).
        let (client, seen) = server(|n| {
            let v = if n <= 2 { "1" } else { "2" };
            Some(Some(lease_json("other", v)))
        });
        let mut l = lease(client);
        let other = Attempt::HeldBy("other".to_owned());
        assert_eq!(l.try_acquire_or_renew().await.ok(), Some(other.clone()));
        tokio::time::advance(Duration::from_millis(1900)).await;
        assert_eq!(l.try_acquire_or_renew().await.ok(), Some(other.clone()));
        tokio::time::advance(Duration::from_millis(200)).await;
        // 2.1 s after version 1 was first seen: expired, but this GET shows
        // version 2 (renewed): it waits again.
        assert_eq!(l.try_acquire_or_renew().await.ok(), Some(other.clone()));
        assert_eq!(l.try_acquire_or_renew().await.ok(), Some(other.clone()));
        tokio::time::advance(Duration::from_millis(2100)).await;
        assert_eq!(l.try_acquire_or_renew().await.ok(), Some(Attempt::Held));
        let seen = seen.lock().map(|s| s.clone()).unwrap_or_default();
        assert_eq!(seen.iter().filter(|m| *m == "PUT").count(), 1, "{seen:?}");
    }
}
