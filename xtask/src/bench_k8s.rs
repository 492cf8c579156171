//! `cargo xtask bench-k8s`: Kubernetes mode against a real API server.
//!
//! 1. Controller at scale: 500 Burstable pods on one Node, `mbcas run --mode
//!    kubernetes --decide off` as a child process, 500 PodAllocations written
//!    at once (server-side apply). Prints the time until every pod's spec CPU
//!    limit is the allocated one, the API requests per resize (deltas of the
//!    kube-apiserver's `apiserver_request_total`), and, once the stand-in
//!    kubelet has reported every pod, the API writes per minute while nothing
//!    changes.
//! 2. A 110-pod node: 110 test cgroups mapped onto the pods
//!    (`--test-pod-cgroups`), real burners in a few of them, a stand-in kubelet
//!    (spec limit → cgroup quota + pod status), and `mbcas run --mode
//!    kubernetes --decide on` for `--seconds`. Prints the daemon's CPU share of
//!    one core (/proc/PID/stat), peak RSS (VmHWM), PodAllocations written and
//!    resizes.
//!
//! Each part runs its own control plane (`testenv --state-dir`, never the shared
//! one) and removes it, its cgroups and every process it started, also on error.
//! Needs root (cgroups) and the cached control-plane binaries (`cargo xtask testenv build`).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::{
    Api, Client,
    api::{
        ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams,
    },
    config::{KubeConfigOptions, Kubeconfig},
};

use crate::testenv::Binaries;

const NS: &str = "mbcas-bench";
const NODE: &str = "mbcas-bench-node";
const CRD: &str = "podallocations.allocation.mbcas.io";
/// Requests in flight at once when creating pods and allocations.
const PARALLEL: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Part {
    All,
    Scale,
    Node,
}

#[derive(Debug, clap::Args)]
pub struct Options {
    /// Which measurement to run.
    #[arg(long, value_enum, default_value_t = Part::All)]
    pub part: Part,
    /// Pods (and PodAllocations) in the controller-at-scale run.
    #[arg(long, default_value_t = 500)]
    pub pods: usize,
    /// Pods on the node in the daemon CPU/RSS run.
    #[arg(long, default_value_t = 110)]
    pub node_pods: usize,
    /// Of those, pods with a full-core burner (limit 200m: throttled).
    #[arg(long, default_value_t = 8)]
    pub burners: usize,
    /// Length of the steady-state window and of the daemon CPU/RSS run, in seconds.
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// Measure the release build of `mbcas` (default: the debug build).
    #[arg(long)]
    pub release: bool,
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    let bin = std::path::absolute(crate::host::build_mbcas(opts.release)?)?;
    if !Binaries::cached().kubectl.is_file() {
        bail!("the control-plane binaries are not cached: run `cargo xtask testenv build` first");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "mbcas: {} ({}); load average at start: {}",
        bin.display(),
        if opts.release { "release" } else { "debug" },
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    if matches!(opts.part, Part::All | Part::Scale) {
        let plane = ControlPlane::up("scale")?;
        rt.block_on(scale(opts, &bin, &plane))?;
        drop(plane);
    }
    if matches!(opts.part, Part::All | Part::Node) {
        let plane = ControlPlane::up("node")?;
        rt.block_on(node(opts, &bin, &plane))?;
        drop(plane);
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// A private control plane, children and cgroups that clean up on drop

struct ControlPlane {
    dir: PathBuf,
    kubeconfig: PathBuf,
}

impl ControlPlane {
    fn up(tag: &str) -> anyhow::Result<Self> {
        let dir = workspace_root()
            .join("target/bench-k8s")
            .join(format!("{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
        let plane = Self {
            kubeconfig: dir.join("kubeconfig"),
            dir,
        };
        let t = Instant::now();
        let ok = plane.xtask(&["up", "--no-build"])?;
        if !ok {
            bail!("testenv up failed (state in {})", plane.dir.display());
        }
        eprintln!("bench-k8s: private control plane up in {:.1?}", t.elapsed());
        Ok(plane)
    }

    fn xtask(&self, args: &[&str]) -> anyhow::Result<bool> {
        let exe = std::env::current_exe().context("current_exe")?;
        let status = Command::new(exe)
            .arg("testenv")
            .arg("--state-dir")
            .arg(&self.dir)
            .args(args)
            .stdout(Stdio::null())
            .status()
            .context("run xtask testenv")?;
        Ok(status.success())
    }

    fn kubectl(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(Binaries::cached().kubectl)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .output()
            .context("run kubectl")?;
        if !out.status.success() {
            bail!(
                "kubectl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    async fn client(&self) -> anyhow::Result<Client> {
        let kc = Kubeconfig::read_from(&self.kubeconfig)
            .with_context(|| format!("read {}", self.kubeconfig.display()))?;
        let cfg = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .context("kubeconfig")?;
        Client::try_from(cfg).context("client")
    }

    /// `apiserver_request_total` summed by (verb, resource, subresource).
    fn requests(&self) -> anyhow::Result<Requests> {
        let text = self.kubectl(&["get", "--raw", "/metrics"])?;
        Ok(parse_requests(&text))
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        match self.xtask(&["down"]) {
            Ok(true) => {
                // The daemon's log outlives the state directory, for a look after the run.
                let log = self.dir.join("mbcas.log");
                if log.exists() {
                    let _ = std::fs::rename(&log, self.dir.with_extension("mbcas.log"));
                }
                let _ = std::fs::remove_dir_all(&self.dir);
                // testenv's lock file sits next to the state directory.
                let _ = std::fs::remove_file(self.dir.with_extension("lock"));
            }
            _ => eprintln!(
                "bench-k8s: could not stop the control plane in {}: run `cargo xtask testenv --state-dir {} down`",
                self.dir.display(),
                self.dir.display()
            ),
        }
    }
}

/// A child process killed (SIGTERM, then SIGKILL) on drop.
struct Kid(Child);

impl Kid {
    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Kid {
    fn drop(&mut self) {
        let _ = crate::cmd::signal(&self.0, nix::sys::signal::Signal::SIGTERM);
        for _ in 0..150 {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Cgroup directories removed (deepest first) on drop; burners go first.
#[derive(Default)]
struct Cgroups {
    dirs: Vec<PathBuf>,
    burners: Vec<Kid>,
}

impl Cgroups {
    fn mkdir(&mut self, p: PathBuf) -> anyhow::Result<PathBuf> {
        std::fs::create_dir(&p).with_context(|| format!("mkdir {} (needs root)", p.display()))?;
        self.dirs.push(p.clone());
        Ok(p)
    }
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        self.burners.clear();
        for d in self.dirs.iter().rev() {
            crate::host::remove_cgroup(d);
        }
    }
}

fn start_daemon(
    bin: &Path,
    plane: &ControlPlane,
    decide: &str,
    extra: &[&str],
) -> anyhow::Result<(Kid, String)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .context("free port")?;
    let addr = format!("127.0.0.1:{port}");
    let log = plane.dir.join("mbcas.log");
    let log = std::fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
    let child = Command::new(bin)
        .args(["run", "--mode", "kubernetes", "--node-name", NODE])
        .arg("--kubeconfig")
        .arg(&plane.kubeconfig)
        .args(["--decide", decide, "--metrics-addr", &addr])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(log.try_clone().context("log")?)
        .stderr(log)
        .spawn()
        .context("start mbcas run")?;
    Ok((Kid(child), addr))
}

/// A minimal HTTP GET (the daemon's /metrics and /readyz).
async fn http_get(addr: &str, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).await.ok()?;
    Some(out)
}

async fn wait_ready(daemon: &mut Kid, addr: &str) -> anyhow::Result<Duration> {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(120) {
        if let Ok(Some(st)) = daemon.0.try_wait() {
            bail!("mbcas exited before it was ready: {st} (see its log in the state dir)");
        }
        if http_get(addr, "/readyz")
            .await
            .is_some_and(|r| r.starts_with("HTTP/1.0 200") || r.starts_with("HTTP/1.1 200"))
        {
            return Ok(t.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("mbcas not ready after 120 s")
}

/// Sum of a counter family in the daemon's /metrics, by its label set.
async fn daemon_counter(addr: &str, name: &str) -> BTreeMap<String, f64> {
    let body = http_get(addr, "/metrics").await.unwrap_or_default();
    let mut out = BTreeMap::new();
    for l in body.lines() {
        let Some(rest) = l.strip_prefix(name) else {
            continue;
        };
        let (labels, value) = match rest.split_once('}') {
            Some((lab, v)) => (lab.trim_start_matches('{').to_owned(), v),
            None => (String::new(), rest),
        };
        if let Ok(v) = value.trim().parse::<f64>() {
            *out.entry(labels).or_default() += v;
        }
    }
    out
}

// ---------------------------------------------------------------------------
// apiserver_request_total

type Key = (String, String, String);

#[derive(Debug, Default, Clone)]
pub(crate) struct Requests(BTreeMap<Key, f64>);

pub(crate) const WRITE_VERBS: &[&str] = &[
    "POST",
    "PUT",
    "PATCH",
    "APPLY",
    "DELETE",
    "DELETECOLLECTION",
];

pub(crate) fn parse_requests(text: &str) -> Requests {
    let mut out = BTreeMap::new();
    for l in text.lines() {
        let Some(rest) = l.strip_prefix("apiserver_request_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.split_once('}') else {
            continue;
        };
        let Ok(v) = value.trim().parse::<f64>() else {
            continue;
        };
        let get = |k: &str| {
            labels
                .split(',')
                .find_map(|kv| kv.strip_prefix(k)?.strip_prefix("=\""))
                .map(|v| v.trim_end_matches('"').to_owned())
                .unwrap_or_default()
        };
        let key = (get("verb"), get("resource"), get("subresource"));
        *out.entry(key).or_default() += v;
    }
    Requests(out)
}

impl Requests {
    /// What happened between `self` (before) and `after`, non-zero only.
    pub(crate) fn delta(&self, after: &Self) -> Self {
        Self(
            after
                .0
                .iter()
                .map(|(k, v)| (k.clone(), v - self.0.get(k).copied().unwrap_or(0.0)))
                .filter(|(_, v)| *v > 0.0)
                .collect(),
        )
    }
    pub(crate) fn get(&self, verbs: &[&str], resource: &str, sub: &str) -> f64 {
        self.0
            .iter()
            .filter(|((v, r, s), _)| verbs.contains(&v.as_str()) && r == resource && s == sub)
            .map(|(_, n)| n)
            .sum()
    }
    pub(crate) fn writes(&self) -> Self {
        Self(
            self.0
                .iter()
                .filter(|((v, _, _), _)| WRITE_VERBS.contains(&v.as_str()))
                .map(|(k, n)| (k.clone(), *n))
                .collect(),
        )
    }
    pub(crate) fn total(&self) -> f64 {
        self.0.values().sum()
    }
    pub(crate) fn print(&self, indent: &str) {
        for ((v, r, s), n) in &self.0 {
            let res = if s.is_empty() {
                r.clone()
            } else {
                format!("{r}/{s}")
            };
            let res = if res.is_empty() {
                "(non-resource)"
            } else {
                &res
            };
            println!("{indent}{v:<8} {res:<32} {n:>8.0}");
        }
    }
}

// ---------------------------------------------------------------------------
// Objects

async fn setup_cluster(plane: &ControlPlane, client: &Client, cpu_m: u64) -> anyhow::Result<()> {
    let crd = workspace_root()
        .join("deploy/crds")
        .join(format!("{CRD}.yaml"));
    plane.kubectl(&["apply", "--server-side", "-f", &crd.display().to_string()])?;
    plane.kubectl(&[
        "wait",
        "--for=condition=Established",
        &format!("crd/{CRD}"),
        "--timeout=60s",
    ])?;
    let nodes: Api<Node> = Api::all(client.clone());
    let node: Node = serde_json::from_value(serde_json::json!({
        "metadata": {"name": NODE, "labels": {"kubernetes.io/hostname": NODE}}
    }))?;
    nodes.create(&PostParams::default(), &node).await?;
    let cpu = format!("{cpu_m}m");
    nodes
        .patch_status(
            NODE,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"status": {
                "capacity": {"cpu": cpu, "memory": "256Gi", "pods": "1000"},
                "allocatable": {"cpu": cpu, "memory": "256Gi", "pods": "1000"},
                "conditions": [{"type": "Ready", "status": "True", "reason": "MbcasBench",
                                "message": "fake node for bench-k8s"}],
            }})),
        )
        .await?;
    let nss: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(serde_json::json!({"metadata": {"name": NS}}))?;
    nss.create(&PostParams::default(), &ns).await?;
    // The namespace's default ServiceAccount (pods need it at admission).
    let t = Instant::now();
    while plane
        .kubectl(&["get", "serviceaccount", "default", "-n", NS])
        .is_err()
    {
        if t.elapsed() > Duration::from_secs(60) {
            bail!("no default ServiceAccount in {NS} after 60 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

fn pod_name(i: usize) -> String {
    format!("pod-{i:04}")
}

/// Creates `n` Burstable pods bound to the node, `PARALLEL` at a time; `shape(i)`
/// gives pod i's (request, limit) in millicores.
async fn create_pods(
    client: &Client,
    n: usize,
    shape: impl Fn(usize) -> (u64, u64),
) -> anyhow::Result<Vec<Pod>> {
    let api: Api<Pod> = Api::namespaced(client.clone(), NS);
    futures::stream::iter(0..n)
        .map(|i| {
            let (req, lim) = shape(i);
            let api = api.clone();
            async move {
                let pod: Pod = serde_json::from_value(serde_json::json!({
                    "metadata": {"name": pod_name(i)},
                    "spec": {"nodeName": NODE, "containers": [{
                        "name": "app", "image": "registry.invalid/app:1",
                        "resources": {"requests": {"cpu": format!("{req}m")},
                                      "limits": {"cpu": format!("{lim}m")}}}]}
                }))?;
                api.create(&PostParams::default(), &pod)
                    .await
                    .with_context(|| format!("create pod {}", pod_name(i)))
            }
        })
        .buffer_unordered(PARALLEL)
        .try_collect()
        .await
}

fn limit_m(pod: &Pod) -> Option<u64> {
    let q = pod
        .spec
        .as_ref()?
        .containers
        .first()?
        .resources
        .as_ref()?
        .limits
        .as_ref()?
        .get("cpu")?;
    crate::e2e::millicores(&q.0)
}

/// Plays the kubelet for one pod: Running, with the CPU resources of its spec.
async fn kubelet_reports(api: &Api<Pod>, pod: &Pod) -> anyhow::Result<()> {
    let name = pod.metadata.name.clone().unwrap_or_default();
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
    api.patch_status(
        &name,
        &PatchParams::default(),
        &Patch::Merge(
            serde_json::json!({"status": {"phase": "Running", "containerStatuses": statuses}}),
        ),
    )
    .await
    .with_context(|| format!("kubelet status for {name}"))?;
    Ok(())
}

fn allocation(pod: &Pod, desired_m: u64) -> serde_json::Value {
    let name = pod.metadata.name.clone().unwrap_or_default();
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let q = format!("{desired_m}m");
    serde_json::json!({
        "apiVersion": "allocation.mbcas.io/v1alpha1",
        "kind": "PodAllocation",
        "metadata": {
            "name": name, "namespace": NS,
            "labels": {"mbcas.io/node": NODE},
            "ownerReferences": [{"apiVersion": "v1", "kind": "Pod", "name": name,
                                  "uid": uid, "controller": false}],
        },
        "spec": {
            "podName": name, "podUid": uid, "nodeName": NODE, "cpuLimit": q,
            "containers": [{"name": "app", "cpuLimit": q}],
            "demand": q, "weight": 0.1, "price": 1.0, "reason": "bench",
        }
    })
}

fn allocations_api(client: &Client) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("allocation.mbcas.io", "v1alpha1", "PodAllocation");
    let ar = ApiResource::from_gvk_with_plural(&gvk, "podallocations");
    Api::namespaced_with(client.clone(), NS, &ar)
}

// ---------------------------------------------------------------------------
// 1. Controller at scale

async fn scale(opts: &Options, bin: &Path, plane: &ControlPlane) -> anyhow::Result<()> {
    const BEFORE: u64 = 200;
    const DESIRED: u64 = 300;
    let n = opts.pods;
    let client = plane.client().await?;
    setup_cluster(plane, &client, 64_000).await?;
    let t = Instant::now();
    let pods = create_pods(&client, n, |_| (100, BEFORE)).await?;
    let create_s = t.elapsed().as_secs_f64();

    let (mut daemon, addr) = start_daemon(bin, plane, "off", &[])?;
    let ready = wait_ready(&mut daemon, &addr).await?;
    let before = plane.requests()?;
    let t0 = Instant::now();
    apply_allocations(&client, &pods, DESIRED).await?;
    let written = t0.elapsed();
    let api: Api<Pod> = Api::namespaced(client.clone(), NS);
    let (polls, converged) = wait_for_limits(&api, n, DESIRED, t0).await?;
    // Let the last status writes and events land before the second reading.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let d = before.delta(&plane.requests()?);
    let resizes = daemon_counter(&addr, "mbcas_resizes_total").await;

    // Play the kubelet for every pod, wait for the daemon to settle, then watch the quiet.
    let pods = api.list(&ListParams::default()).await?.items;
    futures::stream::iter(&pods)
        .map(|p| kubelet_reports(&api, p))
        .buffer_unordered(PARALLEL)
        .try_collect::<Vec<_>>()
        .await?;
    tokio::time::sleep(Duration::from_secs(15)).await;
    let quiet0 = plane.requests()?;
    tokio::time::sleep(Duration::from_secs(opts.seconds)).await;
    let quiet = quiet0.delta(&plane.requests()?);
    if let Ok(Some(st)) = daemon.0.try_wait() {
        bail!("mbcas exited during the run: {st}");
    }
    drop(daemon);
    println!();
    println!(
        "== controller at scale: {n} pods, {n} PodAllocations ({BEFORE}m → {DESIRED}m), --decide off =="
    );
    println!("  pods created ({PARALLEL} in flight)     {create_s:>10.1} s");
    println!(
        "  daemon ready after                  {:>10.1} s",
        ready.as_secs_f64()
    );
    println!(
        "  PodAllocations written in           {:>10.2} s",
        written.as_secs_f64()
    );
    println!(
        "  all {n} pod limits = {DESIRED}m after    {:>10.2} s (from the first write)",
        converged.as_secs_f64()
    );
    println!(
        "  resizes/s                           {:>10.1}",
        n as f64 / converged.as_secs_f64()
    );
    println!("  mbcas_resizes_total                 {resizes:?}");
    print_resize_requests(&d, polls);
    println!(
        "  steady state after the kubelet reported all {n} pods, {} s:",
        opts.seconds
    );
    print_steady_state(&quiet, opts.seconds);
    Ok(())
}

/// Applies one PodAllocation per pod asking for `desired` millicores,
/// PARALLEL at a time.
async fn apply_allocations(client: &Client, pods: &[Pod], desired: u64) -> anyhow::Result<()> {
    let pas = allocations_api(client);
    futures::stream::iter(pods)
        .map(|pod| {
            let pas = pas.clone();
            async move {
                let name = pod.metadata.name.clone().unwrap_or_default();
                pas.patch(
                    &name,
                    &PatchParams::apply("mbcas-bench").force(),
                    &Patch::Apply(allocation(pod, desired)),
                )
                .await
                .with_context(|| format!("apply PodAllocation {name}"))
            }
        })
        .buffer_unordered(PARALLEL)
        .try_collect::<Vec<_>>()
        .await?;
    Ok(())
}

/// Polls until every one of the `n` pods' spec has `desired` millicores:
/// the number of polls and the time since `t0`.
async fn wait_for_limits(
    api: &Api<Pod>,
    n: usize,
    desired: u64,
    t0: Instant,
) -> anyhow::Result<(u64, Duration)> {
    let mut polls = 0u64;
    loop {
        polls += 1;
        let list = api.list(&ListParams::default()).await?;
        let done = list
            .items
            .iter()
            .filter(|p| limit_m(p) == Some(desired))
            .count();
        if done == n {
            return Ok((polls, t0.elapsed()));
        }
        if t0.elapsed() > Duration::from_secs(600) {
            bail!("only {done}/{n} pods resized after 600 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The API requests of the resizes, per resize, apart from the bench's own
/// (its PodAllocation applies and its `polls` pod lists).
fn print_resize_requests(d: &Requests, polls: u64) {
    let resize_patches = d.get(&["PATCH"], "pods", "resize");
    let per = |x: f64| x / resize_patches.max(1.0);
    let status_writes = d.get(WRITE_VERBS, "podallocations", "status");
    let events = d.get(&["POST", "PATCH"], "events", "");
    let bench_applies = d.get(&["APPLY", "PATCH"], "podallocations", "");
    let bench_own = bench_applies + polls as f64;
    // Non-resource requests (/metrics scrapes, /readyz) are not the daemon's.
    let resource_requests: f64 =
        d.0.iter()
            .filter(|((_, r, _), _)| !r.is_empty())
            .map(|(_, n)| n)
            .sum();
    let others = resource_requests - bench_own;
    println!("  API requests (apiserver_request_total deltas, write → converged + 5 s):");
    println!("    pods/resize PATCH                 {resize_patches:>10.0}");
    println!(
        "    podallocations/status writes      {status_writes:>10.0}  ({:.2}/resize)",
        per(status_writes)
    );
    println!(
        "    events POST/PATCH                 {events:>10.0}  ({:.2}/resize)",
        per(events)
    );
    let writes = d.writes().total() - bench_applies;
    println!(
        "    all writes except the bench's PodAllocation applies: {writes:.0} ({:.2}/resize)",
        per(writes)
    );
    println!(
        "    all resource requests except the bench's ({bench_own:.0}): {others:.0} ({:.2}/resize; includes watches and kube-controller-manager)",
        per(others)
    );
    println!("    breakdown:");
    d.print("      ");
}

/// The writes of a quiet window of `seconds` (goal: none but the apiserver's leases).
fn print_steady_state(quiet: &Requests, seconds: u64) {
    let w = quiet.writes();
    // The kube-apiserver renews its own identity Lease every 10 s: not MBCAS.
    let leases = w.get(&["PUT", "PATCH", "POST"], "leases", "");
    let others = w.total() - leases;
    println!(
        "    API writes but leases             {:>10.0}  ({:.1}/min; goal 0)",
        others,
        others * 60.0 / seconds as f64
    );
    println!("    lease renewals (kube-apiserver)   {leases:>10.0}");
    w.print("      ");
}

// ---------------------------------------------------------------------------
// 2. A 110-pod node, deciding

async fn node(opts: &Options, bin: &Path, plane: &ControlPlane) -> anyhow::Result<()> {
    let n = opts.node_pods;
    let hot = opts.burners.min(n);
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get()) as u64;
    let client = plane.client().await?;
    setup_cluster(plane, &client, cores * 1000).await?;
    let shape = move |i: usize| if i < hot { (50, 200) } else { (10, 100) };
    let node = FakeNode::create(plane, n, hot, shape)?;

    let pods = create_pods(&client, n, shape).await?;
    let api: Api<Pod> = Api::namespaced(client.clone(), NS);
    futures::stream::iter(&pods)
        .map(|p| kubelet_reports(&api, p))
        .buffer_unordered(PARALLEL)
        .try_collect::<Vec<_>>()
        .await?;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let kubelet_writes = Arc::new(AtomicU64::new(0));
    let kubelet = stand_in_kubelet(&api, &node, shape, stop.clone(), kubelet_writes.clone());

    let before = plane.requests()?;
    let map_arg = node.map_file.display().to_string();
    let (mut daemon, addr) = start_daemon(bin, plane, "on", &["--test-pod-cgroups", &map_arg])?;
    let ready = wait_ready(&mut daemon, &addr).await;
    let result = async {
        let ready = ready?;
        let pid = daemon.pid();
        let c0 = crate::procs::cpu_seconds(pid);
        let t0 = Instant::now();
        tokio::time::sleep(Duration::from_secs(opts.seconds)).await;
        let c1 = crate::procs::cpu_seconds(pid);
        let window = t0.elapsed().as_secs_f64();
        if let Ok(Some(st)) = daemon.0.try_wait() {
            bail!("mbcas exited during the run: {st}");
        }
        let hwm = crate::procs::status_kib(pid, "VmHWM");
        let d = before.delta(&plane.requests()?);
        let resizes = daemon_counter(&addr, "mbcas_resizes_total").await;
        let pas = allocations_api(&client).list(&ListParams::default()).await?.items.len();
        let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        println!();
        println!("== daemon on a {n}-pod node ({cores} cores, {hot} pods with a full-core burner at 200m), --decide on, {} s ==", opts.seconds);
        println!("  daemon ready after                  {:>10.1} s", ready.as_secs_f64());
        println!("  daemon CPU                          {:>10.2} % of one core (utime+stime over {window:.0} s)", (c1 - c0) / window * 100.0);
        println!("  daemon peak RSS (VmHWM)             {:>10.1} MiB", hwm as f64 / 1024.0);
        let kib = |f: &str| crate::procs::status_kib(pid, f) as f64 / 1024.0;
        println!(
            "  daemon RSS at the end (VmRSS)       {:>10.1} MiB: anonymous {:.1}, file-backed {:.1}, shared memory {:.1}; {} threads",
            kib("VmRSS"),
            kib("RssAnon"),
            kib("RssFile"),
            kib("RssShmem"),
            crate::procs::status_kib(pid, "Threads")
        );
        println!("  PodAllocation spec writes           {:>10.0}", d.get(WRITE_VERBS, "podallocations", ""));
        println!("  PodAllocation objects at the end    {pas:>10}");
        println!("  pods/resize PATCH                   {:>10.0}", d.get(&["PATCH"], "pods", "resize"));
        println!("  mbcas_resizes_total                 {resizes:?}");
        println!("  stand-in kubelet quota updates      {:>10}", kubelet_writes.load(Ordering::Relaxed));
        println!("  load average at the end             {}", load.split_whitespace().take(3).collect::<Vec<_>>().join(" "));
        println!("  API writes (start → end, all clients):");
        d.writes().print("    ");
        Ok(())
    }
    .await;
    stop.store(true, Ordering::Relaxed);
    let _ = kubelet.await;
    drop(daemon);
    drop(node);
    result
}

/// A node without a kubelet: one cgroup per pod (quota from its shape), a
/// burner in each of the first `hot`, and the `--test-pod-cgroups` file that
/// tells the daemon which cgroup is whose. Removed on drop.
struct FakeNode {
    /// Held for its `Drop`: burners stopped, cgroups removed.
    _cgroups: Cgroups,
    /// The quota file of each pod's cgroup, by pod name.
    quota_files: BTreeMap<String, PathBuf>,
    map_file: PathBuf,
}

impl FakeNode {
    fn create(
        plane: &ControlPlane,
        n: usize,
        hot: usize,
        shape: impl Fn(usize) -> (u64, u64),
    ) -> anyhow::Result<Self> {
        let roots = crate::host::CgroupRoots::detect()?;
        if roots.v2 {
            bail!("bench-k8s --part node supports cgroup v1 (this project's CI machines) only");
        }
        let mut cg = Cgroups::default();
        let name = format!("mbcas-bench-k8s-{}", std::process::id());
        cg.mkdir(roots.cpu.join(&name))?;
        if let Some(a) = &roots.cpuacct {
            cg.mkdir(a.join(&name))?;
        }
        let mut map = serde_json::Map::new();
        let mut quota_files = BTreeMap::new();
        for i in 0..n {
            let d = cg.mkdir(roots.cpu.join(&name).join(pod_name(i)))?;
            let acct = match &roots.cpuacct {
                Some(a) => Some(cg.mkdir(a.join(&name).join(pod_name(i)))?),
                None => None,
            };
            write(&d.join("cpu.cfs_period_us"), "100000")?;
            write(&d.join("cpu.cfs_quota_us"), &(shape(i).1 * 100).to_string())?;
            map.insert(
                format!("{NS}/{}", pod_name(i)),
                d.display().to_string().into(),
            );
            quota_files.insert(pod_name(i), d.join("cpu.cfs_quota_us"));
            if i < hot {
                let kid = Kid(Command::new("sh")
                    .args(["-c", "while :; do :; done"])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .spawn()
                    .context("spawn burner")?);
                let pid = kid.pid().to_string();
                cg.burners.push(kid);
                write(&d.join("cgroup.procs"), &pid)?;
                if let Some(a) = &acct {
                    write(&a.join("cgroup.procs"), &pid)?;
                }
            }
        }
        let map_file = plane.dir.join("pod-cgroups.json");
        write(&map_file, &serde_json::Value::Object(map).to_string())?;
        Ok(Self {
            _cgroups: cg,
            quota_files,
            map_file,
        })
    }
}

/// The stand-in kubelet: each pod's spec limit → its cgroup quota, then the
/// pod's status, every 500 ms until `stop`; counts the quotas it wrote.
fn stand_in_kubelet(
    api: &Api<Pod>,
    node: &FakeNode,
    shape: impl Fn(usize) -> (u64, u64),
    stop: Arc<std::sync::atomic::AtomicBool>,
    count: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<()> {
    let api = api.clone();
    let quota = node.quota_files.clone();
    let mut applied: BTreeMap<String, u64> = (0..quota.len())
        .map(|i| (pod_name(i), shape(i).1))
        .collect();
    tokio::spawn(async move {
        while !stop.load(Ordering::Relaxed) {
            if let Ok(list) = api.list(&ListParams::default()).await {
                for p in &list.items {
                    let name = p.metadata.name.clone().unwrap_or_default();
                    let (Some(lim), Some(file)) = (limit_m(p), quota.get(&name)) else {
                        continue;
                    };
                    if applied.get(&name) == Some(&lim) {
                        continue;
                    }
                    if std::fs::write(file, (lim * 100).to_string()).is_ok()
                        && kubelet_reports(&api, p).await.is_ok()
                    {
                        applied.insert(name, lim);
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

fn write(path: &Path, value: &str) -> anyhow::Result<()> {
    std::fs::write(path, value).with_context(|| format!("write {value:?} to {}", path.display()))
}
