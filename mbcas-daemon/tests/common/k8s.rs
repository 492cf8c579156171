//! Kubernetes helpers shared by the control-plane tests: the CRD, pods bound
//! to test nodes, a stand-in kubelet, allocations, and the real daemon run
//! in-process (`mbcas run --mode kubernetes`).
#![allow(dead_code)]

use std::time::Duration;

use k8s_openapi::{
    api::core::v1::Pod,
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api, Client, CustomResourceExt as _,
    api::{Patch, PatchParams, PostParams},
};
use mbcas::{
    cli::{Cli, Command},
    k8s::{
        crd::{Phase, PodAllocation},
        pods::PodFacts,
        publish::{Why, allocation_for},
    },
    units::MilliCpu,
};
use tokio_util::sync::CancellationToken;

use super::apiserver::eventually;

pub const WAIT: Duration = Duration::from_secs(30);

/// Installs (or updates) the CRD as the code generates it (`PodAllocation::crd()`,
/// what `mbcas crd` prints) and waits until it is served.
pub async fn install_crd(client: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = PodAllocation::crd();
    crds.patch(
        "podallocations.allocation.mbcas.io",
        &PatchParams::apply("mbcas-tests").force(),
        &Patch::Apply(&crd),
    )
    .await
    .unwrap_or_else(|e| panic!("install CRD: {e}"));
    eventually("the CRD to be established", WAIT, || async {
        let c = crds.get("podallocations.allocation.mbcas.io").await.ok()?;
        let ok = c
            .status?
            .conditions?
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True");
        let served = client
            .list_api_group_resources("allocation.mbcas.io/v1alpha1")
            .await
            .ok()?
            .resources
            .iter()
            .any(|r| r.name == "podallocations");
        (ok && served).then_some(())
    })
    .await;
}

pub struct PodSpec<'a> {
    pub name: &'a str,
    pub request: &'a str,
    pub limit: Option<&'a str>,
    pub memory_limit: bool,
    pub restart_policy: Option<&'a str>,
    pub labels: serde_json::Value,
    /// A pod-level CPU limit (`spec.resources.limits.cpu`).
    pub pod_limit: Option<&'a str>,
}

impl<'a> PodSpec<'a> {
    pub fn burstable(name: &'a str, request: &'a str, limit: &'a str) -> Self {
        Self {
            name,
            request,
            limit: Some(limit),
            memory_limit: false,
            restart_policy: None,
            labels: serde_json::json!({}),
            pod_limit: None,
        }
    }
}

pub async fn create_pod(client: &Client, ns: &str, node: &str, p: &PodSpec<'_>) -> Pod {
    let mut resources = serde_json::json!({"requests": {"cpu": p.request}});
    if let Some(l) = p.limit {
        resources["limits"] = serde_json::json!({"cpu": l});
    }
    if p.memory_limit {
        resources["requests"]["memory"] = "64Mi".into();
        resources["limits"]["memory"] = "64Mi".into();
    }
    let mut container = serde_json::json!({
        "name": "app", "image": "registry.invalid/app:1", "resources": resources});
    if let Some(rp) = p.restart_policy {
        container["resizePolicy"] =
            serde_json::json!([{"resourceName": "cpu", "restartPolicy": rp}]);
    }
    let mut spec = serde_json::json!({"nodeName": node, "containers": [container]});
    if let Some(l) = p.pod_limit {
        spec["resources"] = serde_json::json!({"limits": {"cpu": l}});
    }
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": p.name, "labels": p.labels},
        "spec": spec
    }))
    .unwrap();
    Api::<Pod>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &pod)
        .await
        .unwrap_or_else(|e| panic!("create pod {ns}/{}: {e}", p.name))
}

/// Plays the kubelet: reports the pod Running with the CPU limits of its spec.
pub async fn kubelet_reports(client: &Client, ns: &str, name: &str) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let pod = pods.get(name).await.unwrap();
    let statuses: Vec<serde_json::Value> = pod
        .spec
        .iter()
        .flat_map(|s| &s.containers)
        .map(|c| {
            serde_json::json!({
                "name": c.name, "image": c.image, "imageID": "", "ready": true,
                "restartCount": 0, "started": true,
                "containerID": format!("containerd://{:0>64}", 1),
                "state": {"running": {"startedAt": "2026-11-25T10:00:00Z"}},
                "resources": c.resources,
            })
        })
        .collect();
    pods.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(
            serde_json::json!({"status": {"phase": "Running", "containerStatuses": statuses}}),
        ),
    )
    .await
    .unwrap_or_else(|e| panic!("kubelet status for {ns}/{name}: {e}"));
}

/// What a kubelet writes when it cannot resize a pod on its node: the
/// `PodResizePending` condition with reason `Infeasible`.
pub async fn kubelet_refuses(client: &Client, ns: &str, name: &str, message: &str) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    pods.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"status": {"conditions": [{
            "type": "PodResizePending", "status": "True", "reason": "Infeasible",
            "message": message, "lastTransitionTime": "2026-11-25T10:00:00Z"}]}})),
    )
    .await
    .unwrap_or_else(|e| panic!("kubelet refusal for {ns}/{name}: {e}"));
}

/// The reasons of the Events about pod `name` that MBCAS published.
pub async fn mbcas_event_reasons(client: &Client, ns: &str, name: &str) -> Vec<String> {
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), ns);
    let list = events
        .list(&kube::api::ListParams::default())
        .await
        .unwrap_or_else(|e| panic!("list events in {ns}: {e}"));
    list.items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .filter(|e| e.reporting_controller.as_deref() == Some("mbcas-daemon"))
        .filter_map(|e| e.reason)
        .collect()
}

pub fn cpu_limit(pod: &Pod) -> Option<MilliCpu> {
    PodFacts::from_pod(pod).ok().and_then(|f| f.limit())
}

/// A PodAllocation asking `desired` for the pod's single container.
pub async fn write_allocation(client: &Client, pod: &Pod, node: &str, desired: MilliCpu) {
    let facts = PodFacts::from_pod(pod).unwrap();
    let pa = allocation_for(
        &facts,
        None,
        node,
        desired,
        &Why {
            demand: desired,
            weight: 100.0,
            price: 1.0,
            reason: "increase_throttled",
        },
    );
    let api: Api<PodAllocation> = Api::namespaced(client.clone(), &facts.namespace);
    api.patch(
        &facts.name,
        &PatchParams::apply("mbcas-tests").force(),
        &Patch::Apply(&pa),
    )
    .await
    .unwrap_or_else(|e| panic!("write PodAllocation {}: {e}", facts.name));
}

/// `mbcas restore --node-name NODE` (stop the node's daemon first).
pub async fn restore_node(client: &Client, node: &str) -> mbcas::k8s::restore::RestoreReport {
    let args = mbcas::k8s::restore::RestoreArgs {
        node_name: Some(node.to_owned()),
        all: false,
        kubeconfig: None,
        json: false,
        stop_daemonset: None,
        stop_timeout: Duration::from_secs(1),
    };
    mbcas::k8s::restore::restore(client.clone(), &args)
        .await
        .unwrap_or_else(|e| panic!("restore node {node}: {e}"))
}

/// A free loopback address for a daemon's `--metrics-addr`.
pub fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// The value of the `mbcas_resizes_total` series with `result` in the
/// daemon's `/metrics` at `addr` (0 when it has no such series).
pub fn resizes_total(addr: &str, result: &str) -> f64 {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("{addr}: {e}"));
    write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let series = format!("mbcas_resizes_total{{result=\"{result}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

/// Runs the real daemon (`mbcas run --mode kubernetes --decide off`) with `client`.
pub struct Daemon {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), mbcas::app::AppError>>,
}

impl Daemon {
    pub fn start(client: Client, node: &str, extra: &[&str]) -> Self {
        // The daemon's logs go to the test's output (shown when a test fails).
        let level = std::env::var("MBCAS_TEST_LOG").unwrap_or_else(|_| "info".to_owned());
        let _ = mbcas::telemetry::init(&level, mbcas::telemetry::LogFormat::Text);
        let mut argv = vec!["mbcas", "run", "--mode", "kubernetes", "--node-name", node];
        // Defaults the caller may override: the controller alone, any free port.
        if !extra.contains(&"--decide") {
            argv.extend_from_slice(&["--decide", "off"]);
        }
        if !extra.contains(&"--metrics-addr") {
            argv.extend_from_slice(&["--metrics-addr", "127.0.0.1:0"]);
        }
        // The node's lease goes where every API server has a namespace (the
        // RBAC tests pass the ServiceAccount's).
        if !extra.contains(&"--daemon-namespace") {
            argv.extend_from_slice(&["--daemon-namespace", "default"]);
        }
        argv.extend_from_slice(extra);
        let cli = Cli::try_parse_from_args(&argv);
        let Command::Run(args) = cli.command else {
            panic!("not a run command")
        };
        let cfg = args.decision.validate().unwrap();
        let stop = CancellationToken::new();
        let s = stop.clone();
        let task =
            tokio::spawn(
                async move { mbcas::app::run_with_client(client, &args, cfg, false, s).await },
            );
        Self { stop, task }
    }

    /// Whether the daemon is still running (it has not exited on its own).
    pub fn is_running(&self) -> bool {
        !self.task.is_finished()
    }

    /// Ends the daemon as a crash would: its tasks are dropped, nothing is
    /// released.
    pub async fn kill(self) {
        self.task.abort();
        let _ = self.task.await;
    }

    pub async fn stop(self) {
        self.stop.cancel();
        match tokio::time::timeout(Duration::from_secs(15), self.task).await {
            Ok(Ok(Ok(()))) => {}
            other => panic!("daemon did not stop cleanly: {other:?}"),
        }
    }
}

trait ParseArgs {
    fn try_parse_from_args(argv: &[&str]) -> Cli;
}

impl ParseArgs for Cli {
    fn try_parse_from_args(argv: &[&str]) -> Cli {
        use clap::Parser as _;
        Cli::try_parse_from(argv).unwrap()
    }
}

pub async fn allocation(client: &Client, ns: &str, name: &str) -> Option<PodAllocation> {
    Api::<PodAllocation>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .ok()
        .flatten()
}

pub async fn phase_is(
    client: &Client,
    ns: &str,
    name: &str,
    phase: Phase,
) -> Option<PodAllocation> {
    allocation(client, ns, name)
        .await
        .filter(|pa| pa.status.as_ref().is_some_and(|s| s.phase == phase))
}
