//! `mbcas run --mode kubernetes`: the node daemon, wired.
//!
//! Start-up checks first (the API server offers `pods/resize`, the
//! PodAllocation CRD is installed, this node's Node object exists, the cgroup
//! layout is understood, which sensor runs and why), each failing with a
//! message a user can act on. Then, under one cancellation token:
//!
//! * the HTTP endpoints (`/metrics`, `/healthz`, `/readyz`);
//! * reflectors over this node's pods (shared with the controller), its
//!   PodAllocations and its Node object;
//! * the resize controller;
//! * with `--decide on`, the decision loop, started once the pod and
//!   allocation stores are synced (so nothing is deleted or decided from a
//!   partial view);
//! * the node's Lease ([`crate::k8s::lease`]): the controller and the decision
//!   loop start only once this daemon holds it, so a second copy on the node
//!   watches and waits; it is released after the others drained.
//!
//! Each task ends with its name and, when it failed, why. A task that ends on
//! its own (which none should) ends the process after the others drain, with
//! that reason, so the DaemonSet restarts it; SIGTERM/SIGINT drain within
//! `--grace-period`. State lives in the cluster (PodAllocations and their
//! status) and the cgroups, so a restart rebuilds it: no limit is changed by a
//! restart alone.

use std::sync::Arc;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::{
    Api, Client,
    runtime::{
        WatchStreamExt as _,
        reflector::{self, Store},
        watcher,
    },
};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::{
    cgroup::Layout,
    config::DecisionConfig,
    decision::DecisionLoop,
    error::error_chain,
    http::{self, Component, Readiness},
    k8s::{
        crd::{GROUP, NODE_LABEL, PodAllocation, VERSION},
        early::CgroupBook,
        lease::{NodeLease, default_identity},
        node::{NodeLoopConfig, NodePods, read_pod_cgroups},
        pods,
        publish::Writer,
        resize::{self, ControllerConfig},
    },
    metrics::Metrics,
    run::{Decide, NodeLeaseMode, RunArgs},
    sensor::Sensor,
};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("--node-name (or MBCAS_NODE_NAME) is required in Kubernetes mode")]
    NoNodeName,
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Client(#[from] crate::k8s::client::ClientError),
    #[error("cannot reach the API server for discovery ({what})")]
    Discovery {
        what: &'static str,
        #[source]
        source: kube::Error,
    },
    #[error(
        "the API server does not offer pods/resize: in-place pod resize needs Kubernetes ≥ 1.33 (feature gate InPlacePodVerticalScaling, on by default from 1.33, GA in 1.35); the server reports {version}"
    )]
    NoResize { version: String },
    #[error(
        "the PodAllocation CRD ({GROUP}/{VERSION}) is not installed: `mbcas crd | kubectl apply -f -` or `kubectl apply -k deploy/`"
    )]
    NoCrd,
    #[error("node {node:?} does not exist in the cluster (check --node-name)")]
    NoNode { node: String },
    #[error("reading node {node}")]
    Node {
        node: String,
        #[source]
        source: kube::Error,
    },
    #[error(transparent)]
    Layout(#[from] crate::cgroup::LayoutError),
    #[error(transparent)]
    Sensor(#[from] crate::sensor::SensorError),
    #[error(transparent)]
    Http(#[from] crate::http::HttpError),
    #[error("internal fault: {0}")]
    Internal(&'static str),
    #[error("task {task} stopped unexpectedly: {why}")]
    TaskEnded { task: &'static str, why: String },
}

/// How a task ended: its name, and why when it failed.
type TaskEnd = (&'static str, Result<(), String>);

impl AppError {
    /// Configuration errors exit 64 like every other usage error.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::NoNodeName | Self::Usage(_) => crate::error::EXIT_USAGE,
            _ => 1,
        }
    }
}

/// Verifies that the API server can do what the daemon needs.
pub async fn preflight(client: &Client, node: &str) -> Result<(), AppError> {
    let core = client
        .list_core_api_resources("v1")
        .await
        .map_err(|source| AppError::Discovery {
            what: "/api/v1",
            source,
        })?;
    if !core.resources.iter().any(|r| r.name == "pods/resize") {
        let version = client
            .apiserver_version()
            .await
            .map(|v| v.git_version)
            .unwrap_or_else(|_| "an unknown version".to_owned());
        return Err(AppError::NoResize { version });
    }
    match client
        .list_api_group_resources(&format!("{GROUP}/{VERSION}"))
        .await
    {
        Ok(list) if list.resources.iter().any(|r| r.name == "podallocations") => {}
        Ok(_) => return Err(AppError::NoCrd),
        Err(kube::Error::Api(s)) if s.code == 404 => return Err(AppError::NoCrd),
        Err(source) => {
            return Err(AppError::Discovery {
                what: "PodAllocation API group",
                source,
            });
        }
    }
    let nodes: Api<Node> = Api::all(client.clone());
    match nodes.get_opt(node).await {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err(AppError::NoNode {
            node: node.to_owned(),
        }),
        Err(source) => Err(AppError::Node {
            node: node.to_owned(),
            source,
        }),
    }
}

/// Runs the node daemon until SIGTERM/SIGINT or `shutdown`.
pub async fn run_kubernetes(
    args: &RunArgs,
    cfg: DecisionConfig,
    debug_log: bool,
    shutdown: CancellationToken,
) -> Result<(), AppError> {
    let client = crate::k8s::client::client(args.kubernetes.kubeconfig.as_deref()).await?;
    run_with_client(client, args, cfg, debug_log, shutdown).await
}

/// [`run_kubernetes`] with a client made by the caller (tests use this to run
/// the daemon as its ServiceAccount).
pub async fn run_with_client(
    client: Client,
    args: &RunArgs,
    cfg: DecisionConfig,
    debug_log: bool,
    shutdown: CancellationToken,
) -> Result<(), AppError> {
    let k = &args.kubernetes;
    let node = k.node_name.clone().ok_or(AppError::NoNodeName)?;
    let pod_cgroups = match &k.test_pod_cgroups {
        Some(p) => read_pod_cgroups(p).map_err(AppError::Usage)?,
        None => Default::default(),
    };
    if k.node_lease == NodeLeaseMode::On && k.lease_duration < std::time::Duration::from_secs(2) {
        return Err(AppError::Usage(format!(
            "--lease-duration must be at least 2s (got {:?})",
            k.lease_duration
        )));
    }
    preflight(&client, &node).await?;
    tracing::info!(node = %node, decide = ?k.decide, "API server offers pods/resize; PodAllocation CRD installed");

    let metrics = Metrics::new();
    metrics.set_node_name(&node);
    let mut components = vec![Component::Pods, Component::Allocations, Component::Node];
    let sensing = match k.decide {
        Decide::On => {
            components.push(Component::Sensor);
            Some(start_sensor(args, debug_log, &metrics)?)
        }
        Decide::Off => None,
    };
    let readiness = Readiness::new(&components);
    let listener = http::bind(cfg.metrics_addr).await?;
    tracing::debug!(addr = ?listener.local_addr().ok(), "metrics listener bound");

    let mut tasks = Tasks {
        set: JoinSet::new(),
        shutdown,
        lease: None,
    };
    {
        let (m, r, c) = (metrics.clone(), readiness.clone(), tasks.shutdown.clone());
        tasks.set.spawn(async move {
            let served = http::serve(listener, m, r, c).await;
            ("http", served.map_err(|e| error_chain(&e)))
        });
    }
    let watches = tasks.watch(&client, &node)?;
    let synced = tasks.follow_readiness(&watches, &readiness);
    let held = match k.node_lease {
        NodeLeaseMode::On => {
            let identity = k.lease_identity.clone().unwrap_or_else(default_identity);
            let lease = NodeLease::new(
                client.clone(),
                &cfg.daemon_namespace,
                &node,
                identity,
                k.lease_duration,
            );
            tasks.hold_lease(lease, metrics.clone())
        }
        NodeLeaseMode::Off => {
            tracing::warn!(
                "--node-lease off: this daemon acts without the node's lease; a second copy on this node would fight it"
            );
            let t = CancellationToken::new();
            t.cancel();
            t
        }
    };
    let mut ccfg = ControllerConfig::new(node.clone());
    ccfg.excluded_namespaces = cfg.excluded_namespaces.clone();
    ccfg.operator_hold = k.operator_hold;
    let cgroups = CgroupBook::default();
    let mut ctx = resize::Context::new(
        client.clone(),
        watches.pods.clone(),
        ccfg,
        Some(metrics.clone()),
    );
    if k.early_quota && sensing.is_some() {
        ctx = ctx.with_early_quota(cgroups.clone());
    }
    if k.weight_lever && sensing.is_some() {
        ctx = ctx.with_weight_lever(cgroups.clone());
    }
    let ctx = Arc::new(ctx);
    tasks.controller(ctx, watches.pod_events, synced.pods.clone(), held.clone());
    if let Some((cgroup_root, sensor)) = sensing {
        let writer = Writer::new(client.clone(), node.clone(), watches.allocations.clone());
        let (mut engine, pacing) = (cfg.engine(), cfg.pacing());
        if k.weight_lever {
            engine.lever = crate::market::Lever::Weight;
        }
        let mode = NodePods::new(
            NodeLoopConfig {
                node: node.clone(),
                decision: cfg,
                priority_weighting: k.priority_weighting,
                cgroup_root,
                pod_cgroups,
            },
            watches.pods.clone(),
            watches.node.clone(),
            writer,
        )
        .with_cgroup_book(cgroups);
        let mode = if k.weight_lever {
            mode.with_weight_lever(Some(metrics.clone()))
        } else {
            mode
        };
        let mut decisions = DecisionLoop::new(mode, sensor, engine, pacing, metrics);
        if let Some(path) = &k.state_file {
            decisions = decisions.with_state_file(path.clone());
        }
        tasks.decisions(decisions, readiness, synced.all, held);
    }
    tasks.join(k.grace_period).await
}

/// Finds the cgroup layout and starts the sensor, saying which runs and why.
fn start_sensor(
    args: &RunArgs,
    debug_log: bool,
    metrics: &Metrics,
) -> Result<(std::path::PathBuf, Sensor), AppError> {
    let layout = Layout::detect()?;
    tracing::info!(layout = ?layout.kind, cpu_root = %layout.cpu_root.display(), "cgroup layout");
    let sensor = Sensor::start(args.local.sensor, debug_log)?;
    if let Some(why) = sensor.fallback_reason() {
        tracing::warn!(
            reason = why,
            "eBPF sensor unavailable; polling cpu.stat instead"
        );
    }
    metrics.set_sensor_mode(sensor.kind().as_str());
    Ok((layout.cpu_root, sensor))
}

/// The stores of this node's watches.
struct Watches {
    /// This node's pods, shared by the decision loop and the controller.
    pods: Store<Pod>,
    pod_events: pods::PodTriggers,
    allocations: Store<PodAllocation>,
    node: Store<Node>,
}

/// Tokens cancelled as the stores sync.
struct Synced {
    pods: CancellationToken,
    all: CancellationToken,
}

/// The daemon's tasks, under one cancellation token.
struct Tasks {
    set: JoinSet<TaskEnd>,
    shutdown: CancellationToken,
    /// The node's lease, released once the tasks drained.
    lease: Option<NodeLease>,
}

impl Tasks {
    /// Starts the watches of this node's pods, PodAllocations and Node object.
    fn watch(&mut self, client: &Client, node: &str) -> Result<Watches, AppError> {
        let (pods, pod_stream, pod_events) = pods::pod_reflector(client.clone(), node);
        let c = self.shutdown.clone();
        self.set
            .spawn(async move { drive(pod_stream, c, "pods").await });
        let (allocations, pa_writer) = reflector::store::<PodAllocation>();
        let api: Api<PodAllocation> = Api::all(client.clone());
        let wc = watcher::Config::default().labels(&format!("{NODE_LABEL}={node}"));
        let s = watcher(api, wc).default_backoff().reflect(pa_writer);
        let c = self.shutdown.clone();
        self.set
            .spawn(async move { drive(s, c, "allocations").await });
        let (node_store, node_stream) = pods::node_reflector(client.clone(), node);
        let c = self.shutdown.clone();
        self.set.spawn(async move {
            let s = node_stream.map(Ok::<(), std::convert::Infallible>);
            drive(s, c, "node").await
        });
        Ok(Watches {
            pods,
            pod_events,
            allocations,
            node: node_store,
        })
    }

    /// Readiness follows the stores. One task waits on them and passes the
    /// news on: in kube-runtime 5.0 `Store::wait_until_ready` wakes only the
    /// last of several concurrent waiters (its oneshot keeps one waker), so no
    /// other task may wait on a store directly.
    fn follow_readiness(&mut self, w: &Watches, readiness: &Readiness) -> Synced {
        let synced = Synced {
            pods: CancellationToken::new(),
            all: CancellationToken::new(),
        };
        let (ps, as_, ns, r, c) = (
            w.pods.clone(),
            w.allocations.clone(),
            w.node.clone(),
            readiness.clone(),
            self.shutdown.clone(),
        );
        let (pods_synced, all_synced) = (synced.pods.clone(), synced.all.clone());
        self.set.spawn(async move {
            tokio::select! {
                () = c.cancelled() => {}
                () = async {
                    // A store whose writer is gone never becomes ready:
                    // the watch task ends and says so.
                    if ps.wait_until_ready().await.is_err() { return; }
                    r.ready(Component::Pods);
                    pods_synced.cancel();
                    if as_.wait_until_ready().await.is_err() { return; }
                    r.ready(Component::Allocations);
                    if ns.wait_until_ready().await.is_err() { return; }
                    r.ready(Component::Node);
                    all_synced.cancel();
                    tracing::info!("pod, allocation and node watches synced");
                    c.cancelled().await;
                } => {}
            }
            ("readiness", Ok(()))
        });
        synced
    }

    /// Takes and renews the node's lease; the returned token is cancelled
    /// once this daemon holds it. Losing it ends the daemon (the DaemonSet
    /// restarts it as a waiting copy).
    fn hold_lease(&mut self, lease: NodeLease, metrics: Metrics) -> CancellationToken {
        let held = CancellationToken::new();
        self.lease = Some(lease.clone());
        let (h, c) = (held.clone(), self.shutdown.clone());
        self.set
            .spawn(async move { ("lease", lease.hold(h, c, metrics).await) });
        held
    }

    /// The resize controller, once the pod store is synced and this daemon
    /// holds the node's lease.
    fn controller(
        &mut self,
        ctx: Arc<resize::Context>,
        pod_events: pods::PodTriggers,
        synced: CancellationToken,
        held: CancellationToken,
    ) {
        let c = self.shutdown.clone();
        self.set.spawn(async move {
            // Reconcile only against a synced pod store, and only as the
            // node's one acting daemon.
            tokio::select! {
                () = c.cancelled() => return ("controller", Ok(())),
                () = async { synced.cancelled().await; held.cancelled().await } => {}
            }
            tracing::info!(
                pods = ctx.pods.state().len(),
                "pod store synced; resize controller started"
            );
            resize::run(ctx, pod_events, c).await;
            ("controller", Ok(()))
        });
    }

    /// The decision loop, once every store is synced (so nothing is deleted or
    /// decided from a partial view) and this daemon holds the node's lease.
    fn decisions(
        &mut self,
        decisions: DecisionLoop<NodePods>,
        readiness: Readiness,
        synced: CancellationToken,
        held: CancellationToken,
    ) {
        let c = self.shutdown.clone();
        self.set.spawn(async move {
            tokio::select! {
                () = c.cancelled() => return ("decisions", Ok(())),
                () = synced.cancelled() => {}
            }
            // Ready while it waits for the lease: a surge update waits for the
            // new copy to be ready before it stops the old one, which holds it.
            readiness.ready(Component::Sensor);
            tokio::select! {
                () = c.cancelled() => return ("decisions", Ok(())),
                () = held.cancelled() => {}
            }
            let decided = decisions.run(c).await;
            ("decisions", decided.map(drop).map_err(|e| match e {}))
        });
    }

    /// Waits for the first task to end: a signal (clean), or a failure that
    /// stops the others. They get `grace` to drain.
    async fn join(mut self, grace: std::time::Duration) -> Result<(), AppError> {
        let first = self.set.join_next().await;
        let failed = if self.shutdown.is_cancelled() {
            None
        } else {
            let (task, why) = match first {
                Some(Ok((task, Ok(())))) => (task, "it returned".to_owned()),
                Some(Ok((task, Err(why)))) => (task, why),
                Some(Err(e)) => ("a task", format!("it panicked or was cancelled: {e}")),
                None => ("none", "no task was running".to_owned()),
            };
            tracing::error!(task, why = %why, "task ended on its own; stopping the daemon");
            self.shutdown.cancel();
            Some((task, why))
        };
        let set = &mut self.set;
        let drained =
            tokio::time::timeout(grace, async { while set.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            tracing::warn!(grace = ?grace, "tasks did not drain in time; exiting");
            self.set.abort_all();
        }
        // Nothing writes any more: a waiting copy may take over at once.
        if let Some(lease) = self.lease {
            match tokio::time::timeout(std::time::Duration::from_secs(5), lease.release()).await {
                Ok(Ok(())) => tracing::info!("node lease released"),
                Ok(Err(e)) => {
                    tracing::warn!(error = %error_chain(&e), "releasing the node lease failed; a waiting copy takes over when it expires")
                }
                Err(_) => tracing::warn!(
                    "releasing the node lease timed out; a waiting copy takes over when it expires"
                ),
            }
        }
        match failed {
            Some((task, why)) => Err(AppError::TaskEnded { task, why }),
            None => Ok(()),
        }
    }
}

/// Polls a watch stream until shutdown, logging errors (watchers retry with
/// backoff). A stream that ends is a fault: it says so.
async fn drive<S, T, E>(stream: S, shutdown: CancellationToken, what: &'static str) -> TaskEnd
where
    S: futures::Stream<Item = Result<T, E>>,
    E: std::fmt::Display,
{
    futures::pin_mut!(stream);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return (what, Ok(())),
            next = stream.next() => match next {
                Some(Ok(_)) => {}
                Some(Err(e)) => tracing::warn!(watch = what, error = %e, "watch error; retrying"),
                None => return (what, Err("the watch stream ended".to_owned())),
            },
        }
    }
}
