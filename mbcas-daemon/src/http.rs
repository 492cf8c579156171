//! The daemon's HTTP endpoints: `/metrics`, `/healthz`, `/readyz`.
//!
//! * `GET /metrics` — every metric of [`Metrics`] as OpenMetrics text, content
//!   type [`crate::metrics::CONTENT_TYPE`].
//! * `GET /healthz` — liveness: `200 ok` while the server runs (the kubelet
//!   restarts the container when it stops answering).
//! * `GET /readyz` — readiness: `200 ok` once every component named in the
//!   [`Readiness`] (e.g. the sensor and the informers) has been marked ready;
//!   before that `503` with the components still pending, one per line.
//!
//! [`serve`] runs until its cancellation token fires, then stops accepting and
//! finishes the requests in flight (graceful shutdown).

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard},
};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics::{self, Metrics};

/// What the daemon waits for before it is ready.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Component {
    /// The sensor has attached (or fallen back) and the decision loop runs.
    Sensor,
    /// The watch of this node's pods has synced.
    Pods,
    /// The watch of this node's PodAllocations has synced.
    Allocations,
    /// The watch of this node's Node object has synced.
    Node,
}

impl Component {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Sensor => "sensor",
            Self::Pods => "pods",
            Self::Allocations => "allocations",
            Self::Node => "node",
        }
    }
}

/// Shared readiness: a fixed set of components, each ready or not. The daemon
/// is ready when all of them are. Cheap to clone; clones share state.
#[derive(Clone, Debug)]
pub struct Readiness {
    components: Arc<Mutex<BTreeMap<Component, bool>>>,
}

impl Readiness {
    /// A readiness state with these components, none of them ready yet.
    pub fn new(components: &[Component]) -> Self {
        Self {
            components: Arc::new(Mutex::new(components.iter().map(|&c| (c, false)).collect())),
        }
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<Component, bool>> {
        // A panicking holder cannot leave the map inconsistent (single inserts).
        match self.components.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Marks a component ready (or not ready again, e.g. after a watch broke).
    pub fn set(&self, component: Component, ready: bool) -> Result<(), HttpError> {
        match self.lock().get_mut(&component) {
            Some(v) => {
                *v = ready;
                Ok(())
            }
            None => Err(HttpError::UnknownComponent {
                component: component.as_str(),
            }),
        }
    }

    /// Marks a component ready.
    pub fn mark_ready(&self, component: Component) -> Result<(), HttpError> {
        self.set(component, true)
    }

    /// [`Self::mark_ready`] where a component missing from the set is a
    /// wiring fault: logged as an error, since `/readyz` would stay at 503.
    pub fn ready(&self, component: Component) {
        if let Err(e) = self.mark_ready(component) {
            tracing::error!(error = %e, "readiness wiring fault");
        }
    }

    /// Whether every component is ready.
    pub fn is_ready(&self) -> bool {
        self.lock().values().all(|&r| r)
    }

    /// The components not ready yet.
    pub fn pending(&self) -> Vec<&'static str> {
        self.lock()
            .iter()
            .filter(|(_, r)| !**r)
            .map(|(c, _)| c.as_str())
            .collect()
    }
}

#[derive(Clone)]
struct AppState {
    metrics: Metrics,
    readiness: Readiness,
}

/// The router with the three endpoints; exposed for tests that drive it in-process.
pub fn router(metrics: Metrics, readiness: Readiness) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(AppState { metrics, readiness })
}

async fn metrics_handler(State(s): State<AppState>) -> Response {
    match s.metrics.encode() {
        Ok(body) => ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], body).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "metrics encoding failed");
            (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response()
        }
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(s): State<AppState>) -> Response {
    let pending = s.readiness.pending();
    if pending.is_empty() {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        let body: String = pending
            .iter()
            .map(|c| format!("{c}: not ready\n"))
            .collect();
        (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
    }
}

/// Binds the listen address (e.g. `0.0.0.0:9090`; port 0 picks a free port).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, HttpError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| HttpError::Bind { addr, source })
}

/// Serves the endpoints on `listener` until `cancel` fires, then drains the
/// requests in flight and returns.
pub async fn serve(
    listener: TcpListener,
    metrics: Metrics,
    readiness: Readiness,
    cancel: CancellationToken,
) -> Result<(), HttpError> {
    let addr = listener
        .local_addr()
        .map_err(|source| HttpError::Serve { source })?;
    tracing::info!(%addr, "serving /metrics, /healthz, /readyz");
    axum::serve(listener, router(metrics, readiness))
        .with_graceful_shutdown(async move { cancel.cancelled().await })
        .await
        .map_err(|source| HttpError::Serve { source })?;
    tracing::info!(%addr, "HTTP server stopped");
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot listen on {addr} (is the port in use? see --metrics-addr)")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP server failed")]
    Serve {
        #[source]
        source: std::io::Error,
    },
    #[error("readiness component {component:?} was not registered")]
    UnknownComponent { component: &'static str },
}

#[cfg(test)]
mod tests;
