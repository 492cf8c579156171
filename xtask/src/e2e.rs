//! The end-to-end scenario, one piece of code for every cluster it runs on:
//! the test environment's real node (`cargo xtask test`'s node tier,
//! `cargo xtask node-e2e`) and a Kind cluster (`cargo xtask kind-e2e`).
//!
//! It applies `deploy/` with kustomize, waits for the DaemonSet to be ready,
//! runs real workload pods (`mbcas burn` in the `mbcas` image) and checks, from
//! the API and from the pods' real cgroups on the node:
//! 1. a throttled Burstable pod's CPU limit is raised in one resize through `pods/resize`,
//!    the kubelet writes the new quota into the container's cgroup, the pod's
//!    status reports it, its PodAllocation reaches `Applied`, the container
//!    does not restart and its throttled-period ratio falls;
//! 2. the limit then holds still (no flapping), and restarts of the daemon,
//!    the kubelet, containerd and the API server change no limit;
//! 3. a two-container pod gets a limit per container, each in its own cgroup;
//! 4. a Guaranteed pod, a `RestartContainer` pod and a kube-system pod keep
//!    their limits and do not restart;
//! 5. with the DaemonSet removed, `mbcas restore --all` puts every original
//!    limit back on the running pods and deletes the PodAllocations;
//! 6. the Helm chart (`deploy/helm/mbcas/`) installs the same daemon, which
//!    resizes the burner again, and `helm uninstall`'s pre-delete hook stops
//!    it and puts every original limit back.

use std::{
    path::PathBuf,
    process::Command,
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

/// Where the scenario runs.
pub trait Cluster {
    /// kubectl, pointed at the cluster.
    fn kubectl(&self) -> Command;
    /// Runs `script` with `sh -c` on the node named `node`; its stdout.
    fn on_node(&self, node: &str, script: &str) -> anyhow::Result<String>;
    /// The kustomization to apply (`deploy/`, or an overlay of it).
    fn deploy_dir(&self) -> PathBuf;
    /// The kubeconfig `mbcas restore` uses from this machine.
    fn kubeconfig(&self) -> Option<PathBuf>;
    /// The image with `/usr/local/bin/mbcas` in it, present on the node.
    fn image(&self) -> &str;
    /// Kills one of the node's or the control plane's processes (`kubelet`,
    /// `containerd`, `kube-apiserver`), waits `down`, starts it again and
    /// waits until it serves. `Ok(false)`: this cluster cannot do that.
    fn restart(&self, component: &str, down: Duration) -> anyhow::Result<bool>;
    /// The last lines of the MBCAS daemon's log, for a failed run's report.
    fn daemon_log(&self) -> String;
    /// Where this machine reaches the daemon's `/metrics`, when it can: a
    /// real Prometheus then checks the Grafana dashboard's queries.
    fn metrics(&self) -> Option<std::net::SocketAddr> {
        None
    }
    /// The Helm values this cluster needs on top of the chart's defaults (what
    /// its kustomize overlay changes).
    fn helm_values(&self) -> Value {
        json!({})
    }
}

const NAMESPACE: &str = "mbcas-e2e";
const DAEMON_NAMESPACE: &str = "mbcas-system";
const BURNER: &str = "burner";
const BURNER_LIMIT: u64 = 300;
/// What the e2e's operator resizes the throttled burner to by hand.
const OPERATOR_LIMIT: u64 = 250;
const DUO: &str = "duo";
const DUO_LIMITS: [(&str, u64); 2] = [("app", 200), ("sidecar", 100)];
const GUARANTEED: &str = "guaranteed";
/// An idle Guaranteed pod holding most of the node.
const HOLDER: &str = "holder";
/// A pod without a CPU limit, busy.
const LIMITLESS: &str = "limitless";
const RESTART: &str = "restart-on-resize";
/// Two spinning threads on a small request: more than its share.
const HOG: &str = "hog";
const SYSTEM_POD: &str = "mbcas-e2e-system";
const UNTOUCHED_LIMIT: u64 = 200;
const RAISE_TIMEOUT: Duration = Duration::from_secs(180);

/// Runs `cmd`; its stdout, or what it printed as the error.
pub(crate) fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("failed to start {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub(crate) fn kubectl(c: &dyn Cluster, args: &[&str]) -> anyhow::Result<String> {
    let mut cmd = c.kubectl();
    cmd.args(args);
    run(&mut cmd)
}

pub(crate) fn apply(c: &dyn Cluster, object: &Value) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut cmd = c.kubectl();
    cmd.args(["apply", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().context("failed to start kubectl apply")?;
    child
        .stdin
        .take()
        .context("kubectl apply: no stdin")?
        .write_all(object.to_string().as_bytes())
        .context("kubectl apply: write")?;
    let out = child.wait_with_output().context("kubectl apply")?;
    if !out.status.success() {
        bail!(
            "kubectl apply failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Millicores of a CPU quantity as the API server prints it (`200m`, `1`, `1.5`).
pub use mbcas_common::quantity::millicores;

// ---------------------------------------------------------------------------
// Pods

pub(crate) fn container(name: &str, image: &str, request: u64, limit: u64, burn: &[&str]) -> Value {
    let mut args = vec!["burn"];
    args.extend(burn);
    json!({
        "name": name,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "args": args,
        "resources": {
            "requests": {"cpu": format!("{request}m"), "memory": "16Mi"},
            "limits": {"cpu": format!("{limit}m"), "memory": "64Mi"},
        },
    })
}

/// Waits until every pod in `namespace` is Ready (`timeout` in kubectl's
/// syntax, e.g. `120s`).
pub(crate) fn wait_pods_ready(
    c: &dyn Cluster,
    namespace: &str,
    timeout: &str,
) -> anyhow::Result<()> {
    kubectl(
        c,
        &[
            "-n",
            namespace,
            "wait",
            "--for=condition=Ready",
            "pod",
            "--all",
            &format!("--timeout={timeout}"),
        ],
    )
    .map(|_| ())
}

pub(crate) fn pod(namespace: &str, name: &str, containers: Vec<Value>) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app.kubernetes.io/part-of": "mbcas-e2e"}},
        "spec": {
            "containers": containers,
            "automountServiceAccountToken": false,
            "terminationGracePeriodSeconds": 1,
        },
    })
}

fn workload(image: &str) -> Vec<Value> {
    let burner = pod(
        NAMESPACE,
        BURNER,
        vec![container(
            "burn",
            image,
            100,
            BURNER_LIMIT,
            &["--percent", "50"],
        )],
    );
    // `app` wants 300 m under a 200 m limit, the sidecar idles: the pod's
    // own quota (300 m) never binds, only `app`'s does.
    let duo = pod(
        NAMESPACE,
        DUO,
        vec![
            container("app", image, 50, DUO_LIMITS[0].1, &["--percent", "30"]),
            container("sidecar", image, 20, DUO_LIMITS[1].1, &["--percent", "1"]),
        ],
    );
    let mut limitless = pod(
        NAMESPACE,
        LIMITLESS,
        vec![container("burn", image, 50, 0, &["--percent", "20"])],
    );
    if let Some(limits) = limitless["spec"]["containers"][0]["resources"]["limits"].as_object_mut()
    {
        limits.remove("cpu");
    }
    let mut guaranteed = pod(
        NAMESPACE,
        GUARANTEED,
        vec![container(
            "burn",
            image,
            UNTOUCHED_LIMIT,
            UNTOUCHED_LIMIT,
            &[],
        )],
    );
    guaranteed["spec"]["containers"][0]["resources"]["requests"]["memory"] = json!("64Mi");
    let mut restart = pod(
        NAMESPACE,
        RESTART,
        vec![container("burn", image, 50, UNTOUCHED_LIMIT, &[])],
    );
    restart["spec"]["containers"][0]["resizePolicy"] =
        json!([{"resourceName": "cpu", "restartPolicy": "RestartContainer"}]);
    let system = pod(
        "kube-system",
        SYSTEM_POD,
        vec![container("burn", image, 50, UNTOUCHED_LIMIT, &[])],
    );
    vec![burner, duo, guaranteed, restart, system, limitless]
}

/// The idle Guaranteed pod that holds `millicores` of `node`.
fn holder(image: &str, node: &str, millicores: u64) -> Value {
    let mut p = pod(
        NAMESPACE,
        HOLDER,
        vec![container(
            "burn",
            image,
            millicores,
            millicores,
            &["--percent", "1"],
        )],
    );
    p["spec"]["containers"][0]["resources"]["requests"]["memory"] = json!("64Mi");
    p["spec"]["nodeName"] = json!(node);
    p
}

/// One container as the API reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ContainerView {
    pub name: String,
    pub spec_limit: Option<u64>,
    pub status_limit: Option<u64>,
    pub restarts: u64,
    pub id: String,
}

#[derive(Debug, Clone)]
pub(crate) struct PodView {
    pub node: String,
    /// `metadata.generation`: 1 at creation, +1 for each resize.
    pub generation: u64,
    pub containers: Vec<ContainerView>,
}

pub(crate) fn pod_view(c: &dyn Cluster, namespace: &str, name: &str) -> anyhow::Result<PodView> {
    let v: Value = serde_json::from_str(&kubectl(
        c,
        &["-n", namespace, "get", "pod", name, "-o", "json"],
    )?)
    .with_context(|| format!("pod {namespace}/{name}: bad JSON"))?;
    let statuses = v["status"]["containerStatuses"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let containers = v["spec"]["containers"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|ctr| {
            let name = ctr["name"].as_str().unwrap_or_default().to_owned();
            let status = statuses
                .iter()
                .find(|s| s["name"] == name.as_str())
                .cloned()
                .unwrap_or(Value::Null);
            ContainerView {
                spec_limit: ctr["resources"]["limits"]["cpu"]
                    .as_str()
                    .and_then(millicores),
                status_limit: status["resources"]["limits"]["cpu"]
                    .as_str()
                    .and_then(millicores),
                restarts: status["restartCount"].as_u64().unwrap_or(0),
                id: status["containerID"]
                    .as_str()
                    .unwrap_or_default()
                    .rsplit("://")
                    .next()
                    .unwrap_or_default()
                    .to_owned(),
                name,
            }
        })
        .collect();
    Ok(PodView {
        node: v["spec"]["nodeName"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        generation: v["metadata"]["generation"].as_u64().unwrap_or(0),
        containers,
    })
}

pub(crate) fn first(p: &PodView) -> anyhow::Result<&ContainerView> {
    p.containers.first().context("pod has no containers")
}

// ---------------------------------------------------------------------------
// The container's cgroup, read on the node

/// The container's CPU cgroup directory on the node (v1 `cpu` hierarchy or v2).
pub(crate) fn cgroup_dir(
    c: &dyn Cluster,
    node: &str,
    container_id: &str,
) -> anyhow::Result<String> {
    if container_id.len() < 12 || !container_id.chars().all(|ch| ch.is_ascii_hexdigit()) {
        bail!("unexpected container id {container_id:?}");
    }
    let script = format!(
        "for f in $(find /sys/fs/cgroup -maxdepth 9 -type d -name '*{container_id}*' 2>/dev/null); do \
         if [ -f \"$f/cpu.cfs_quota_us\" ] || [ -f \"$f/cpu.max\" ]; then echo \"$f\"; fi; done"
    );
    let out = c.on_node(node, &script)?;
    out.lines()
        .next()
        .map(str::to_owned)
        .with_context(|| format!("no CPU cgroup of container {container_id} on the node"))
}

/// The CPU limit the kernel enforces on the cgroup, in millicores (None: unlimited).
fn cgroup_limit(c: &dyn Cluster, node: &str, dir: &str) -> anyhow::Result<Option<u64>> {
    let out = c.on_node(
        node,
        &format!(
            "if [ -f {dir}/cpu.max ]; then cat {dir}/cpu.max; \
         else echo \"$(cat {dir}/cpu.cfs_quota_us) $(cat {dir}/cpu.cfs_period_us)\"; fi"
        ),
    )?;
    parse_quota(&out).with_context(|| format!("{dir}: unexpected quota {out:?}"))
}

pub(crate) fn parse_quota(text: &str) -> Option<Option<u64>> {
    let mut it = text.split_whitespace();
    let (quota, period) = (it.next()?, it.next()?.parse::<u64>().ok()?);
    if quota == "max" || quota == "-1" {
        return Some(None);
    }
    let quota: u64 = quota.parse().ok()?;
    (period > 0).then(|| Some((quota * 1000).div_ceil(period)))
}

/// `(nr_periods, nr_throttled)` of the cgroup.
fn cgroup_periods(c: &dyn Cluster, node: &str, dir: &str) -> anyhow::Result<(u64, u64)> {
    let out = c.on_node(node, &format!("cat {dir}/cpu.stat"))?;
    let get = |key: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(key)?.trim().parse::<u64>().ok())
    };
    match (get("nr_periods "), get("nr_throttled ")) {
        (Some(p), Some(t)) => Ok((p, t)),
        _ => bail!("{dir}/cpu.stat: no nr_periods/nr_throttled in {out:?}"),
    }
}

fn ratio(a: (u64, u64), b: (u64, u64)) -> f64 {
    let periods = b.0.saturating_sub(a.0);
    if periods == 0 {
        return 0.0;
    }
    b.1.saturating_sub(a.1) as f64 / periods as f64
}

// ---------------------------------------------------------------------------
// The scenario

fn phase(c: &dyn Cluster, name: &str) -> String {
    kubectl(
        c,
        &[
            "-n",
            NAMESPACE,
            "get",
            "podallocation",
            name,
            "-o",
            "jsonpath={.status.phase}",
        ],
    )
    .unwrap_or_default()
}

pub(crate) fn wait_until<T>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut check: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    let mut last_error = None;
    loop {
        match check() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_error = Some(e),
        }
        if Instant::now() > deadline {
            bail!(
                "timed out after {timeout:?} waiting for {what}{}",
                last_error.map_or(String::new(), |e| format!(" (last error: {e:#})"))
            );
        }
        sleep(every);
    }
}

/// What the scenario measured, for the caller to print or record.
#[derive(Debug, Default)]
pub struct Report {
    pub raised_to: u64,
    pub raise_seconds: f64,
    pub throttled_before: f64,
    pub throttled_after: f64,
    pub limit_changes_in_steady_window: usize,
    pub passed: Vec<String>,
}

impl Report {
    fn ok(&mut self, line: String) {
        eprintln!("e2e: ok: {line}");
        self.passed.push(line);
    }
}

/// Deletes the scenario's namespace and its kube-system pod (errors ignored:
/// they may not exist).
fn delete_workload(c: &dyn Cluster, wait: bool) {
    let wait = if wait { "--wait=true" } else { "--wait=false" };
    let _ = kubectl(
        c,
        &["delete", "namespace", NAMESPACE, "--ignore-not-found", wait],
    );
    let _ = kubectl(
        c,
        &[
            "-n",
            "kube-system",
            "delete",
            "pod",
            SYSTEM_POD,
            "--ignore-not-found",
            wait,
        ],
    );
}

/// Runs the whole scenario; cleans up its pods and namespace either way.
pub fn run_scenario(c: &dyn Cluster) -> anyhow::Result<Report> {
    let result = scenario(c);
    delete_workload(c, false);
    if result.is_err() {
        for args in [
            &["-n", DAEMON_NAMESPACE, "get", "pods", "-o", "wide"][..],
            &["-n", NAMESPACE, "get", "podallocations", "-o", "wide"][..],
        ] {
            if let Ok(out) = kubectl(c, args) {
                eprintln!("e2e: kubectl {}:\n{out}", args.join(" "));
            }
        }
        eprintln!("e2e: the daemon's log:\n{}", c.daemon_log());
    }
    result
}

fn scenario(c: &dyn Cluster) -> anyhow::Result<Report> {
    let mut report = Report::default();
    let deploy = c.deploy_dir();
    kubectl(c, &["apply", "-k", &deploy.display().to_string()])?;
    daemon_ready(c)
        .context("the MBCAS DaemonSet did not become ready (its readiness probe is /readyz)")?;
    report.ok("deploy/ applied with kustomize; the DaemonSet's pod is Ready (/readyz)".into());
    let burner = start_workload(c, &mut report)?;
    let at_raise = check_raise(c, &mut report, &burner)?;
    check_steady(c, &mut report, &burner, at_raise)?;
    // With pods managed and resized: a real Prometheus answers every panel.
    if let Some(addr) = c.metrics() {
        let n = crate::prometheus::check_dashboard(addr, Duration::from_secs(20))?;
        report.ok(format!(
            "a real Prometheus scraping the daemon answers all {n} queries of the Grafana dashboard (and `up`) and the node scores (one series named by the node, in 0..1) with series"
        ));
    }
    check_duo(c, &mut report)?;
    check_lending(c, &mut report, &burner.node)?;
    check_weight_lever(c, &mut report, &burner.node)?;
    user_view(c);
    check_untouched(c, &mut report)?;
    check_limitless(c, &mut report)?;
    // 5. Faults: nothing lost, no limit changed by a restart alone.
    faults(c, &mut report, &burner.node, &burner.dir)?;
    check_operator_change(c, &mut report, &burner)?;
    try_adding_a_limit(c, &mut report)?;
    check_restore(c, &mut report)?;
    check_helm(c, &mut report)?;
    // Leave MBCAS deployed, as found.
    kubectl(c, &["apply", "-k", &deploy.display().to_string()])?;
    Ok(report)
}

/// The burner's container cgroup, and when its pod was created.
struct Burner {
    node: String,
    dir: String,
    started: Instant,
}

/// Creates the workload's pods and finds the burner's container cgroup.
fn start_workload(c: &dyn Cluster, report: &mut Report) -> anyhow::Result<Burner> {
    delete_workload(c, true);
    kubectl(c, &["create", "namespace", NAMESPACE])?;
    for p in workload(c.image()) {
        apply(c, &p)?;
    }
    let started = Instant::now();
    // The burner's cgroup as soon as its container exists: MBCAS raises a
    // throttled pod within seconds, often before the pod reports Ready.
    let (node, dir) = wait_until(
        &format!("{BURNER}'s container cgroup on the node"),
        Duration::from_secs(120),
        Duration::from_millis(100),
        || {
            let p = pod_view(c, NAMESPACE, BURNER)?;
            let ctr = first(&p)?;
            if ctr.id.is_empty() {
                return Ok(None);
            }
            Ok(cgroup_dir(c, &p.node, &ctr.id)
                .ok()
                .map(|d| (p.node.clone(), d)))
        },
    )?;
    let first_quota = cgroup_limit(c, &node, &dir)?;
    if first_quota.is_none_or(|q| q < BURNER_LIMIT) {
        bail!(
            "{BURNER}'s cgroup {dir} enforces {first_quota:?} m, less than its {BURNER_LIMIT}m limit"
        );
    }
    report.ok(format!(
        "{BURNER}'s container cgroup found on the node ({dir}), first quota read {first_quota:?}m"
    ));
    let (allocatable, requested) = node_cpu(c, &node)?;
    let hold = allocatable.saturating_sub(requested + 100);
    if hold < allocatable / 2 {
        bail!(
            "node {node}: {allocatable}m allocatable, {requested}m requested: no room for an idle Guaranteed pod holding most of it"
        );
    }
    apply(c, &holder(c.image(), &node, hold))?;
    report.ok(format!(
        "{HOLDER}: an idle Guaranteed pod holding {hold}m of the node's {allocatable}m"
    ));

    Ok(Burner { node, dir, started })
}

/// The node's allocatable CPU, and what the pods on it request, millicores.
fn node_cpu(c: &dyn Cluster, node: &str) -> anyhow::Result<(u64, u64)> {
    let n: Value = serde_json::from_str(&kubectl(c, &["get", "node", node, "-o", "json"])?)
        .context("node: bad JSON")?;
    let allocatable = n["status"]["allocatable"]["cpu"]
        .as_str()
        .and_then(millicores)
        .with_context(|| format!("node {node}: no allocatable CPU"))?;
    let requested = node_pods(c, node)?
        .iter()
        .map(|p| p.containers.iter().map(|(req, _)| req).sum::<u64>())
        .sum();
    Ok((allocatable, requested))
}

/// A pod on the node, as its CPU: each container's (request, limit).
struct NodePod {
    namespace: String,
    name: String,
    containers: Vec<(u64, Option<u64>)>,
}

/// The pods on `node` that hold CPU (not finished).
fn node_pods(c: &dyn Cluster, node: &str) -> anyhow::Result<Vec<NodePod>> {
    let selector = format!("spec.nodeName={node}");
    let v: Value = serde_json::from_str(&kubectl(
        c,
        &[
            "get",
            "pods",
            "-A",
            "--field-selector",
            &selector,
            "-o",
            "json",
        ],
    )?)
    .context("pods: bad JSON")?;
    let items = v["items"].as_array().cloned().unwrap_or_default();
    Ok(items
        .iter()
        .filter(|p| !matches!(p["status"]["phase"].as_str(), Some("Succeeded" | "Failed")))
        .map(|p| NodePod {
            namespace: p["metadata"]["namespace"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            name: p["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            containers: p["spec"]["containers"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .map(|ctr| {
                    let r = &ctr["resources"];
                    let limit = r["limits"]["cpu"].as_str().and_then(millicores);
                    // The API server defaults a missing request to the limit.
                    let request = r["requests"]["cpu"].as_str().and_then(millicores).or(limit);
                    (request.unwrap_or(0), limit)
                })
                .collect(),
        })
        .collect())
}

/// An idle Guaranteed pod holding most of the node: MBCAS counts the
/// unmanaged pods by what they use, so the managed pods together hold more
/// than the unmanaged pods' limits (their requests without one) leave.
fn check_lending(c: &dyn Cluster, report: &mut Report, node: &str) -> anyhow::Result<()> {
    let (allocatable, _) = node_cpu(c, node)?;
    let (mut managed, mut others) = (0, 0);
    for p in node_pods(c, node)? {
        let limits: u64 = p
            .containers
            .iter()
            .map(|(req, lim)| lim.unwrap_or(*req))
            .sum();
        if p.namespace == NAMESPACE && (p.name == BURNER || p.name == DUO) {
            managed += limits;
        } else {
            others += limits;
        }
    }
    let by_limits = allocatable.saturating_sub(others);
    if managed <= by_limits {
        bail!(
            "the managed pods hold {managed}m, no more than the {by_limits}m the unmanaged pods' limits leave of {allocatable}m: the idle {HOLDER} is not lent"
        );
    }
    report.ok(format!(
        "{BURNER} and {DUO} hold {managed}m next to the idle {HOLDER}, where the unmanaged pods' limits ({others}m of {allocatable}m) would leave {by_limits}m"
    ));
    Ok(())
}

/// The weight lever: a pod that uses far more than its entitlement gets its
/// pod cgroup's `cpu.shares` lowered to 1/8 of the kubelet's; the kubelet
/// leaves it lowered (also across a limits resize); opted out, it gets the
/// kubelet's weight back.
fn check_weight_lever(c: &dyn Cluster, report: &mut Report, node: &str) -> anyhow::Result<()> {
    // The idle holder leaves 100 m of the node's requests.
    const REQUEST: u64 = 50;
    let image = c.image();
    let mut hog = pod(
        NAMESPACE,
        HOG,
        vec![container(
            "burn",
            image,
            REQUEST,
            800,
            &["--threads", "2", "--percent", "100"],
        )],
    );
    hog["spec"]["nodeName"] = json!(node);
    apply(c, &hog)?;
    let result = weight_lever_on(c, report, REQUEST);
    let _ = kubectl(c, &["-n", NAMESPACE, "delete", "pod", HOG, "--wait=false"]);
    result
}

fn weight_lever_on(c: &dyn Cluster, report: &mut Report, request: u64) -> anyhow::Result<()> {
    // The kubelet's shares for the request, and what MBCAS lowers them to.
    let kubelet = (request * 1024 / 1000).max(2);
    let lowered = ((kubelet as f64) / 8.0).round().max(2.0) as u64;
    let dir = wait_until(
        "the hog's container cgroup",
        Duration::from_secs(60),
        Duration::from_secs(1),
        || {
            let v = pod_view(c, NAMESPACE, HOG)?;
            let id = first(&v)?.id.clone();
            if id.is_empty() {
                return Ok(None);
            }
            cgroup_dir(c, &v.node, &id).map(|d| Some((v.node, d)))
        },
    )?;
    let (node, pod_dir) = (
        dir.0,
        std::path::Path::new(&dir.1)
            .parent()
            .context("container cgroup without a parent")?
            .display()
            .to_string(),
    );
    let weight = |c: &dyn Cluster| -> anyhow::Result<u64> {
        let out = c.on_node(
            &node,
            &format!(
                "if [ -f {pod_dir}/cpu.weight ]; then echo v2; else cat {pod_dir}/cpu.shares; fi"
            ),
        )?;
        let out = out.trim();
        if out == "v2" {
            bail!("the weight lever check reads cgroup v1's cpu.shares; {pod_dir} is v2");
        }
        out.parse()
            .with_context(|| format!("{pod_dir}/cpu.shares: {out:?}"))
    };
    let t0 = Instant::now();
    wait_until(
        &format!("the hog's pod cgroup at {lowered} shares (the kubelet's {kubelet} / 8)"),
        Duration::from_secs(60),
        Duration::from_millis(500),
        || Ok((weight(c)? == lowered).then_some(())),
    )
    .with_context(|| format!("shares now: {:?}", weight(c).ok()))?;
    let lowered_in = t0.elapsed();
    // Held for 10 s: the kubelet resets the weight when it carries out a
    // resize; MBCAS puts it back within a second (the controller on seeing
    // the resize applied, or the next round).
    let generation = pod_view(c, NAMESPACE, HOG)?.generation;
    let (mut off, mut off_since) = (0, None::<Instant>);
    let watch = Instant::now();
    while watch.elapsed() < Duration::from_secs(10) {
        sleep(Duration::from_millis(250));
        let now = weight(c)?;
        if now == lowered {
            off_since = None;
            continue;
        }
        off += 1;
        let since = *off_since.get_or_insert_with(Instant::now);
        if since.elapsed() > Duration::from_secs(2) {
            bail!("the held hog's pod cgroup at {now} shares, not {lowered}, for more than 2 s");
        }
    }
    let resized = pod_view(c, NAMESPACE, HOG)?
        .generation
        .saturating_sub(generation);
    kubectl(
        c,
        &[
            "-n",
            NAMESPACE,
            "label",
            "pod",
            HOG,
            "mbcas.io/ignore=true",
            "--overwrite",
        ],
    )?;
    let t1 = Instant::now();
    wait_until(
        &format!("the opted-out hog's pod cgroup back at the kubelet's {kubelet} shares"),
        Duration::from_secs(30),
        Duration::from_millis(500),
        || Ok((weight(c)? == kubelet).then_some(())),
    )
    .with_context(|| format!("shares now: {:?}", weight(c).ok()))?;
    let back_in = t1.elapsed();
    // Gone before the next checks: a busy unmanaged pod moves the others'
    // entitlement with every swing of its use.
    kubectl(c, &["-n", NAMESPACE, "delete", "pod", HOG, "--wait=true"])?;
    report.ok(format!(
        "weight lever: the 2-thread {HOG} (request {request}m) lowered to {lowered} of {kubelet} shares in {:.1} s, \
         held 10 s ({resized} resizes meanwhile; {off} samples in 10 s found the kubelet's reset, none for 2 s), opted out: back to {kubelet} in {:.1} s",
        lowered_in.as_secs_f64(),
        back_in.as_secs_f64()
    ));
    Ok(())
}

/// How long the raised quota is watched (the kubelet's pass comes within it).
const EARLY_WATCH: Duration = Duration::from_secs(3);

/// The raise, end to end; the burner's periods counters at the raise.
fn check_raise(c: &dyn Cluster, report: &mut Report, b: &Burner) -> anyhow::Result<(u64, u64)> {
    let (node, burner_dir, started) = (&b.node, &b.dir, b.started);
    // 1. The raise, end to end: the quota the kernel enforces changes, then
    // spec, status and the PodAllocation agree with it.
    let (raised, at_raise) = wait_until(
        &format!("MBCAS to raise {BURNER}'s quota above {BURNER_LIMIT}m"),
        RAISE_TIMEOUT,
        Duration::from_millis(100),
        || {
            let quota = cgroup_limit(c, node, burner_dir)?;
            let periods = cgroup_periods(c, node, burner_dir)?;
            Ok(quota.filter(|&q| q > BURNER_LIMIT).map(|q| (q, periods)))
        },
    )?;
    report.raise_seconds = started.elapsed().as_secs_f64();
    // The daemon writes an accepted increase into the cgroup ahead of the
    // kubelet (`--early-quota`): for 3 s the quota never goes back below the
    // new one (the kubelet must not write the old value after it), and spec,
    // status and the cgroup agree within them.
    let t0 = Instant::now();
    let (mut lowest, mut agreed_after) = (raised, None);
    while t0.elapsed() < EARLY_WATCH {
        let quota = cgroup_limit(c, node, burner_dir)?;
        lowest = lowest.min(quota.unwrap_or(0));
        if agreed_after.is_none() {
            let p = pod_view(c, NAMESPACE, BURNER)?;
            let ctr = first(&p)?;
            if ctr.spec_limit.is_some()
                && ctr.status_limit == ctr.spec_limit
                && quota == ctr.spec_limit
            {
                agreed_after = Some(t0.elapsed());
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if lowest < raised {
        bail!(
            "{BURNER}'s quota went from {raised}m back down to {lowest}m within {EARLY_WATCH:?} of the raise (the kubelet wrote an old value after the daemon's?)"
        );
    }
    let Some(agreed_after) = agreed_after else {
        bail!(
            "{BURNER}: spec, status and cgroup quota did not agree within {EARLY_WATCH:?} of the new quota"
        );
    };
    report.ok(format!(
        "{BURNER}: the new quota ({raised}m) never went lower in the {EARLY_WATCH:?} after it; spec = status = cgroup {:.2} s after it",
        agreed_after.as_secs_f64()
    ));
    for pods in [NAMESPACE, "kube-system"] {
        let what = if pods == NAMESPACE {
            vec!["pod", "--all"]
        } else {
            vec!["pod", SYSTEM_POD]
        };
        let mut args = vec!["-n", pods, "wait", "--for=condition=Ready"];
        args.extend(what);
        args.push("--timeout=120s");
        kubectl(c, &args)?;
    }
    let applied = wait_until(
        &format!("the kubelet to actuate {BURNER}'s new limit"),
        Duration::from_secs(60),
        Duration::from_secs(1),
        || {
            let p = pod_view(c, NAMESPACE, BURNER)?;
            let ctr = first(&p)?;
            let quota = cgroup_limit(c, node, burner_dir)?;
            let done = ctr.spec_limit.is_some()
                && ctr.status_limit == ctr.spec_limit
                && quota == ctr.spec_limit
                && phase(c, BURNER) == "Applied";
            Ok(done.then(|| (ctr.clone(), quota, p.generation)))
        },
    )?;
    let (ctr, quota, generation) = applied;
    // One patch per decision, and one decision for the raise: the pod's
    // generation counts its resizes.
    let resizes = generation.saturating_sub(1);
    if resizes != 1 {
        bail!(
            "{BURNER} took {resizes} resizes to reach {:?}m (generation {generation}; goal: one)",
            ctr.spec_limit
        );
    }
    if ctr.restarts != 0 {
        bail!(
            "{BURNER} restarted {} times during the resize",
            ctr.restarts
        );
    }
    report.raised_to = ctr.spec_limit.unwrap_or(raised);
    report.ok(format!(
        "{BURNER}: limit {BURNER_LIMIT}m → {raised}m after {:.1} s in one resize through pods/resize; \
             spec {:?}m = status {:?}m = cgroup quota {:?}m; PodAllocation Applied; 0 restarts",
        report.raise_seconds, ctr.spec_limit, ctr.status_limit, quota
    ));

    Ok(at_raise)
}

/// Steady: the limit holds, throttling is lower than before the raise.
fn check_steady(
    c: &dyn Cluster,
    report: &mut Report,
    b: &Burner,
    at_raise: (u64, u64),
) -> anyhow::Result<()> {
    let (node, burner_dir) = (&b.node, &b.dir);
    // The cgroup is new: its counters since creation are all under the first limit.
    let at_start = (0, 0);
    // 2. Steady: the limit holds, throttling is lower than before the raise.
    let window = Duration::from_secs(30);
    let mut limits = Vec::new();
    let steady_start = cgroup_periods(c, node, burner_dir)?;
    let window_start = Instant::now();
    while window_start.elapsed() < window {
        limits.push(first(&pod_view(c, NAMESPACE, BURNER)?)?.spec_limit);
        sleep(Duration::from_secs(2));
    }
    let steady_end = cgroup_periods(c, node, burner_dir)?;
    report.limit_changes_in_steady_window = limits.windows(2).filter(|w| w[0] != w[1]).count();
    report.throttled_before = ratio(at_start, at_raise);
    report.throttled_after = ratio(steady_start, steady_end);
    if report.limit_changes_in_steady_window > 2 {
        bail!(
            "{BURNER}'s limit changed {} times in {window:?} of steady load (flapping): {limits:?}",
            report.limit_changes_in_steady_window
        );
    }
    if at_raise.1 == 0 {
        // Raised before it was throttled under its first limit (alone on the
        // node, a pod's entitlement is the whole capacity, so MBCAS raises it
        // on its first round): there is no "before"; it must simply not be
        // throttled now.
        if report.throttled_after > 0.05 {
            bail!(
                "{BURNER}, raised before it was throttled, is throttled in {:.3} of its periods after the raise",
                report.throttled_after
            );
        }
    } else if report.throttled_after >= report.throttled_before {
        bail!(
            "{BURNER}'s throttled-period ratio did not fall: {:.3} under {BURNER_LIMIT}m, {:.3} after the raise",
            report.throttled_before,
            report.throttled_after
        );
    }
    report.ok(
        format!(
            "{BURNER}: throttled-period ratio {:.3} → {:.3} (cgroup cpu.stat); {} limit changes in {window:?} of steady load",
            report.throttled_before, report.throttled_after, report.limit_changes_in_steady_window
        ),
    );

    Ok(())
}

/// Two containers, a limit each, each in its own cgroup; `app` is throttled
/// by its own quota while the pod's is not: MBCAS reads the containers'
/// cgroups and raises `app`.
fn check_duo(c: &dyn Cluster, report: &mut Report) -> anyhow::Result<()> {
    let duo = pod_view(c, NAMESPACE, DUO)?;
    for (name, _) in DUO_LIMITS {
        let ctr = duo
            .containers
            .iter()
            .find(|x| x.name == name)
            .with_context(|| format!("{DUO} has no container {name}"))?;
        let dir = cgroup_dir(c, &duo.node, &ctr.id)?;
        let quota = cgroup_limit(c, &duo.node, &dir)?;
        if quota != ctr.spec_limit || ctr.status_limit != ctr.spec_limit {
            bail!(
                "{DUO}/{name}: spec {:?}m, status {:?}m, cgroup {quota:?}m disagree",
                ctr.spec_limit,
                ctr.status_limit
            );
        }
        if ctr.restarts != 0 {
            bail!("{DUO}/{name} restarted {} times", ctr.restarts);
        }
    }
    let (app, original) = DUO_LIMITS[0];
    let raised = duo
        .containers
        .iter()
        .find(|x| x.name == app)
        .and_then(|x| x.spec_limit)
        .is_some_and(|l| l > original);
    let limits = duo
        .containers
        .iter()
        .map(|x| format!("{}={:?}m", x.name, x.spec_limit))
        .collect::<Vec<_>>()
        .join(", ");
    if !raised {
        bail!(
            "{DUO}/{app}, throttled under its own {original}m quota while the pod's was not, was not raised: {limits}"
        );
    }
    report.ok(format!(
        "{DUO}: {app}, throttled by its own quota (the pod's never bound), raised; the idle sidecar sized by its use: {limits}"
    ));

    Ok(())
}

/// A pod without a CPU limit: MBCAS leaves it alone (it counts what it
/// uses).
fn check_limitless(c: &dyn Cluster, report: &mut Report) -> anyhow::Result<()> {
    let p = pod_view(c, NAMESPACE, LIMITLESS)?;
    let ctr = first(&p)?;
    if ctr.spec_limit.is_some() || ctr.restarts != 0 {
        bail!(
            "{LIMITLESS} was touched: spec {:?}m, {} restarts",
            ctr.spec_limit,
            ctr.restarts
        );
    }
    let allocations = kubectl(c, &["-n", NAMESPACE, "get", "podallocations", "-o", "name"])?;
    if allocations
        .lines()
        .any(|l| l.ends_with(&format!("/{LIMITLESS}")))
    {
        bail!("MBCAS wrote a PodAllocation for {LIMITLESS}, which has no CPU limit");
    }
    report.ok(format!(
        "{LIMITLESS} (no CPU limit) left alone, no PodAllocation"
    ));
    Ok(())
}

/// Whether the API lets a CPU limit be added in place to a container without
/// one (reported); the pod is deleted afterwards either way, since with a
/// limit it would be MBCAS's to manage.
fn try_adding_a_limit(c: &dyn Cluster, report: &mut Report) -> anyhow::Result<()> {
    let p = pod_view(c, NAMESPACE, LIMITLESS)?;
    let name = first(&p)?.name.clone();
    let patch =
        json!({"spec": {"containers": [{"name": name, "resources": {"limits": {"cpu": "300m"}}}]}});
    let answer = kubectl(
        c,
        &[
            "-n",
            NAMESPACE,
            "patch",
            "pod",
            LIMITLESS,
            "--subresource",
            "resize",
            "-p",
            &patch.to_string(),
        ],
    );
    let answer = match answer {
        Ok(_) => {
            let now = pod_view(c, NAMESPACE, LIMITLESS)?;
            format!("accepted (spec limit now {:?}m)", first(&now)?.spec_limit)
        }
        Err(e) => format!(
            "refused: {}",
            e.to_string().lines().last().unwrap_or_default().trim()
        ),
    };
    kubectl(
        c,
        &["-n", NAMESPACE, "delete", "pod", LIMITLESS, "--wait=true"],
    )?;
    report.ok(format!(
        "adding a CPU limit in place through pods/resize to a container without one: {answer}"
    ));
    Ok(())
}

/// Guaranteed, RestartContainer and kube-system pods: never touched.
fn check_untouched(c: &dyn Cluster, report: &mut Report) -> anyhow::Result<()> {
    // 4. Never touched.
    for (namespace, name) in [
        (NAMESPACE, GUARANTEED),
        (NAMESPACE, RESTART),
        ("kube-system", SYSTEM_POD),
    ] {
        let p = pod_view(c, namespace, name)?;
        let ctr = first(&p)?;
        let quota = cgroup_limit(c, &p.node, &cgroup_dir(c, &p.node, &ctr.id)?)?;
        if ctr.spec_limit != Some(UNTOUCHED_LIMIT)
            || quota != Some(UNTOUCHED_LIMIT)
            || ctr.restarts != 0
        {
            bail!(
                "{namespace}/{name} was touched: spec {:?}m, cgroup {quota:?}m, {} restarts",
                ctr.spec_limit,
                ctr.restarts
            );
        }
    }
    report.ok(format!(
        "{GUARANTEED} (Guaranteed), {RESTART} (RestartContainer) and kube-system/{SYSTEM_POD} \
             kept {UNTOUCHED_LIMIT}m in spec and cgroup, 0 restarts"
    ));

    Ok(())
}

/// An operator resizes the throttled burner by hand (`kubectl patch
/// --subresource resize`): MBCAS adopts the operator's limit as the original
/// (status, Event) and leaves the pod alone though it stays throttled.
fn check_operator_change(c: &dyn Cluster, report: &mut Report, b: &Burner) -> anyhow::Result<()> {
    let patch = json!({"spec": {"containers": [
        {"name": "burn", "resources": {"limits": {"cpu": format!("{OPERATOR_LIMIT}m")}}}
    ]}});
    kubectl(
        c,
        &[
            "-n",
            NAMESPACE,
            "patch",
            "pod",
            BURNER,
            "--subresource",
            "resize",
            "-p",
            &patch.to_string(),
        ],
    )?;
    let patched = Instant::now();
    let status = wait_until(
        "MBCAS to adopt the operator's resize of the burner",
        Duration::from_secs(30),
        Duration::from_millis(500),
        || {
            let pa: Value = serde_json::from_str(&kubectl(
                c,
                &[
                    "-n",
                    NAMESPACE,
                    "get",
                    "podallocation",
                    BURNER,
                    "-o",
                    "json",
                ],
            )?)?;
            let st = pa["status"].clone();
            Ok((st["reason"] == "OperatorChange").then_some(st))
        },
    )?;
    let adopted_in = patched.elapsed().as_secs_f64();
    let original = &status["original"][0]["cpuLimit"];
    if status["phase"] != "Skipped"
        || *original != json!(format!("{OPERATOR_LIMIT}m"))
        || status["operatorChange"]["manager"] != "kubectl-patch"
    {
        bail!("{BURNER}'s allocation after the operator's resize: {status}");
    }
    // Held: the burner wants 500 m and is throttled under 250 m, which MBCAS
    // raised within seconds before; for 20 s nothing moves it.
    let (quota, _) = wait_until(
        "the kubelet to apply the operator's limit",
        Duration::from_secs(30),
        Duration::from_millis(500),
        || {
            let q = cgroup_limit(c, &b.node, &b.dir)?;
            Ok((q == Some(OPERATOR_LIMIT)).then_some((q, ())))
        },
    )?;
    let at_hold = cgroup_periods(c, &b.node, &b.dir)?;
    let hold = Duration::from_secs(20);
    let start = Instant::now();
    while start.elapsed() < hold {
        let p = pod_view(c, NAMESPACE, BURNER)?;
        let now = cgroup_limit(c, &b.node, &b.dir)?;
        let spec = first(&p)?.spec_limit;
        if spec != Some(OPERATOR_LIMIT) || now != quota {
            bail!(
                "{BURNER}: the operator's {OPERATOR_LIMIT}m was overridden {:.1} s later: spec {spec:?}m, cgroup {now:?}m",
                patched.elapsed().as_secs_f64()
            );
        }
        sleep(Duration::from_secs(2));
    }
    let throttled = ratio(at_hold, cgroup_periods(c, &b.node, &b.dir)?);
    let events: Value = serde_json::from_str(&kubectl(
        c,
        &[
            "-n",
            NAMESPACE,
            "get",
            "events",
            "--field-selector",
            &format!("involvedObject.name={BURNER},reason=OperatorChangeAdopted"),
            "-o",
            "json",
        ],
    )?)?;
    let n = events["items"].as_array().map_or(0, Vec::len);
    if n != 1 {
        bail!("{n} OperatorChangeAdopted events on {BURNER} for one resize by hand");
    }
    report.ok(format!(
        "an operator's `kubectl patch --subresource resize` of {BURNER} to {OPERATOR_LIMIT}m: adopted as the original in {adopted_in:.1} s \
         (status OperatorChange, one Event); left alone for {}s though throttled in {throttled:.2} of its periods",
        hold.as_secs()
    ));
    Ok(())
}

/// Restore, with the daemon gone: the original limits back everywhere.
fn check_restore(c: &dyn Cluster, report: &mut Report) -> anyhow::Result<()> {
    // 6. Restore, with the daemon gone.
    kubectl(
        c,
        &[
            "-n",
            DAEMON_NAMESPACE,
            "delete",
            "daemonset",
            "mbcas",
            "--wait=true",
        ],
    )?;
    wait_until(
        "the MBCAS pod to go",
        Duration::from_secs(60),
        Duration::from_secs(1),
        || {
            let out = kubectl(
                c,
                &[
                    "-n",
                    DAEMON_NAMESPACE,
                    "get",
                    "pods",
                    "-l",
                    "app.kubernetes.io/name=mbcas",
                    "-o",
                    "name",
                ],
            )?;
            Ok(out.trim().is_empty().then_some(()))
        },
    )?;
    let mut restore = Command::new(build_mbcas()?);
    restore.args(["restore", "--all", "--json"]);
    if let Some(k) = c.kubeconfig() {
        restore.arg("--kubeconfig").arg(k);
    }
    let restored = run(&mut restore)?;
    wait_for_originals(c).with_context(|| format!("mbcas restore said: {restored}"))?;
    let left = kubectl(c, &["get", "podallocations", "-A", "-o", "name"])?;
    if !left.trim().is_empty() {
        bail!("PodAllocations left after restore: {left}");
    }
    report.ok(
        "with the DaemonSet deleted, `mbcas restore --all` put the originals back (the burner's \
         250m, the operator's; the duo's 200m/100m) in spec, status and cgroup and deleted every PodAllocation"
            .into(),
    );
    Ok(())
}

/// Waits until the burner and the duo have their original limits in spec,
/// status and cgroup.
fn wait_for_originals(c: &dyn Cluster) -> anyhow::Result<()> {
    // The burner's original is the operator's (check_operator_change).
    let expect: Vec<(&str, &str, u64)> = std::iter::once((BURNER, "burn", OPERATOR_LIMIT))
        .chain(DUO_LIMITS.iter().map(|(n, l)| (DUO, *n, *l)))
        .collect();
    wait_until(
        "the original limits back in spec, status and cgroups",
        Duration::from_secs(60),
        Duration::from_secs(1),
        || {
            for (pod_name, ctr_name, want) in &expect {
                let p = pod_view(c, NAMESPACE, pod_name)?;
                let ctr = p
                    .containers
                    .iter()
                    .find(|x| x.name == *ctr_name)
                    .context("container vanished")?;
                let quota = cgroup_limit(c, &p.node, &cgroup_dir(c, &p.node, &ctr.id)?)?;
                if ctr.spec_limit != Some(*want)
                    || ctr.status_limit != Some(*want)
                    || quota != Some(*want)
                {
                    return Ok(None);
                }
            }
            Ok(Some(()))
        },
    )
}

/// What an operator sees: `kubectl get podallocations -A` and the burner's
/// events (printed for the log; the README shows a run's).
fn user_view(c: &dyn Cluster) {
    if let Ok(out) = kubectl(c, &["get", "podallocations", "-A"]) {
        eprintln!("e2e: $ kubectl get podallocations -A\n{out}");
    }
    if let Ok(out) = kubectl(c, &["-n", NAMESPACE, "describe", "pod", BURNER]) {
        let events = out
            .split_once("\nEvents:")
            .map_or("(no events)", |(_, e)| e);
        eprintln!("e2e: $ kubectl -n {NAMESPACE} describe pod {BURNER}   # Events:{events}");
    }
}

/// helm with the cluster's kubeconfig, in the daemon's namespace.
fn helm(c: &dyn Cluster, args: &[&str]) -> anyhow::Result<String> {
    let mut cmd = crate::helm::helm()?;
    if let Some(k) = c.kubeconfig() {
        cmd.arg("--kubeconfig").arg(k);
    }
    cmd.args(["--namespace", DAEMON_NAMESPACE]).args(args);
    run(&mut cmd)
}

/// Step 6, the Helm chart: installed in place of deploy/, it runs the same daemon,
/// which resizes the burner again; `helm uninstall` runs the pre-delete hook
/// (`mbcas restore --all --stop-daemonset`), which stops the daemon and puts
/// every original limit back before the chart's objects go.
fn check_helm(c: &dyn Cluster, report: &mut Report) -> anyhow::Result<()> {
    // The objects of deploy/ that the chart owns (the DaemonSet is already
    // gone; the namespace stays the user's, and Helm leaves an existing CRD).
    kubectl(
        c,
        &[
            "-n",
            DAEMON_NAMESPACE,
            "delete",
            "serviceaccount/mbcas",
            "role/mbcas-node-lease",
            "rolebinding/mbcas-node-lease",
            "--ignore-not-found",
        ],
    )?;
    kubectl(
        c,
        &[
            "delete",
            "clusterrole/mbcas-node-daemon",
            "clusterrolebinding/mbcas-node-daemon",
            "--ignore-not-found",
        ],
    )?;
    // The burner was resized by hand (check_operator_change) and the hold
    // lasts 30 min: the chart's daemon is told to adopt it and carry on
    // (the chart's `config.operatorHold`, checked on the way).
    let mut values = c.helm_values();
    values["config"]["operatorHold"] = json!("0s");
    let values = crate::helm::values_file("e2e", &values)?;
    let chart = crate::helm::chart_dir().display().to_string();
    let values = values.display().to_string();
    // The raise is timed from the install: the daemon may resize before
    // the rollout is reported Ready.
    let started = Instant::now();
    let installed = helm(
        c,
        &[
            "install",
            crate::helm::RELEASE,
            &chart,
            "-f",
            &values,
            "--wait",
            "--timeout",
            "3m",
        ],
    );
    if let Err(e) = installed {
        let _ = helm(c, &["uninstall", crate::helm::RELEASE, "--no-hooks"]);
        return Err(e.context("helm install"));
    }
    let while_installed = |report: &mut Report| -> anyhow::Result<()> {
        daemon_ready(c)?;
        report.ok("helm install: the chart's DaemonSet is Ready (/readyz)".into());
        let raised = wait_until(
            "the chart's daemon to raise the burner again",
            RAISE_TIMEOUT,
            Duration::from_secs(1),
            || {
                let l = first(&pod_view(c, NAMESPACE, BURNER)?)?.spec_limit;
                Ok(l.filter(|l| *l > BURNER_LIMIT))
            },
        )?;
        report.ok(format!(
            "helm install: the chart's daemon (operatorHold 0s) adopted the operator's {OPERATOR_LIMIT}m and raised {BURNER} → {raised}m {:.1} s after `helm install` began",
            started.elapsed().as_secs_f64()
        ));
        Ok(())
    };
    let checked = while_installed(report);
    let removed = helm(
        c,
        &[
            "uninstall",
            crate::helm::RELEASE,
            "--wait",
            "--timeout",
            "4m",
        ],
    );
    checked?;
    let said = removed.context("helm uninstall (its pre-delete hook restores the limits)")?;
    wait_for_originals(c).with_context(|| format!("helm uninstall said: {said}"))?;
    let left = kubectl(c, &["get", "podallocations", "-A", "-o", "name"])?;
    let daemons = kubectl(
        c,
        &[
            "-n",
            DAEMON_NAMESPACE,
            "get",
            "daemonsets,jobs,serviceaccounts",
            "-l",
            "app.kubernetes.io/part-of=mbcas",
            "-o",
            "name",
        ],
    )?;
    if !left.trim().is_empty() || !daemons.trim().is_empty() {
        bail!("left after helm uninstall: {left}{daemons}");
    }
    report.ok(
        "helm uninstall: the pre-delete hook stopped the daemon and put 250m/200m/100m back \
         (spec, status, cgroup); no PodAllocation, DaemonSet or hook Job left"
            .into(),
    );
    Ok(())
}

/// Every limit the scenario's pods have now: `pod/container → millicores`.
fn limits_now(c: &dyn Cluster) -> anyhow::Result<Vec<(String, Option<u64>, u64)>> {
    let mut v = Vec::new();
    for name in [BURNER, DUO, GUARANTEED, RESTART] {
        for ctr in pod_view(c, NAMESPACE, name)?.containers {
            v.push((format!("{name}/{}", ctr.name), ctr.spec_limit, ctr.restarts));
        }
    }
    Ok(v)
}

fn daemon_ready(c: &dyn Cluster) -> anyhow::Result<()> {
    kubectl(
        c,
        &[
            "-n",
            DAEMON_NAMESPACE,
            "rollout",
            "status",
            "daemonset/mbcas",
            "--timeout=180s",
        ],
    )
    .map(|_| ())
}

/// Kubelet, containerd and the API server restarted: after each, every pod
/// still runs with the limits it had (a restart alone changes none), none
/// restarted, and the burner's cgroup never enforced less than before while
/// MBCAS was blind. Then the daemon's own pod is recreated (see below).
fn faults(
    c: &dyn Cluster,
    report: &mut Report,
    node: &str,
    burner_dir: &str,
) -> anyhow::Result<()> {
    // Limits first settle: MBCAS lowers a raised limit towards the need a step
    // per cooldown (30 s by default), and a limit raised on a throttled
    // window's upper estimate comes down as the demand model's peak decays
    // (half-life 60 s: the duo's came down 77 s after its last raise), so
    // settled means unchanged for 120 s (nine readings 15 s apart).
    let mut readings = vec![limits_now(c)?];
    let before = wait_until(
        "the limits to settle (unchanged for 120 s) before the faults",
        Duration::from_secs(420),
        Duration::from_secs(15),
        || {
            readings.push(limits_now(c)?);
            let n = readings.len();
            Ok(
                (n >= 9 && readings[n - 9..].windows(2).all(|w| w[0] == w[1]))
                    .then(|| readings[n - 1].clone()),
            )
        },
    )?;
    report.ok(format!("limits settled before the faults: {before:?}"));
    let burner_quota = cgroup_limit(c, node, burner_dir)?;
    let check = |what: &str| -> anyhow::Result<Vec<String>> {
        // The API answers again; give the daemon two rounds to act, if it would.
        wait_until(
            &format!("the API server after {what}"),
            Duration::from_secs(120),
            Duration::from_secs(1),
            || Ok(limits_now(c).ok()),
        )?;
        daemon_ready(c).with_context(|| format!("MBCAS not ready after {what}"))?;
        sleep(Duration::from_secs(10));
        let after = limits_now(c)?;
        let quota = cgroup_limit(c, node, burner_dir)?;
        // Never a restart, a lost or a lowered limit (a pod's total: its
        // containers are sized by their use within it). A raise is reported,
        // not failed: the fault also disturbs the load, and MBCAS keeps
        // deciding (in one CI run, as the API server came back, the duo's
        // peak rose and MBCAS raised it 420 → 540 m, `increase`).
        let total = |v: &[(String, Option<u64>, u64)], pod: &str| -> Option<u64> {
            v.iter()
                .filter(|(n, _, _)| n.split('/').next() == Some(pod))
                .map(|(_, l, _)| *l)
                .sum()
        };
        let names = |v: &[(String, Option<u64>, u64)]| -> Vec<String> {
            v.iter().map(|(n, _, _)| n.clone()).collect()
        };
        let restarted = after.iter().zip(&before).any(|(a, b)| a.2 != b.2);
        if names(&after) != names(&before) || restarted {
            bail!(
                "{what} changed the containers or restarted one: before {before:?}, after {after:?}"
            );
        }
        let mut raised = Vec::new();
        for pod in [BURNER, DUO, GUARANTEED, RESTART] {
            let (was, now) = (total(&before, pod), total(&after, pod));
            if now.is_none() || now < was {
                bail!("{what} lowered or lost {pod}'s limit: before {before:?}, after {after:?}");
            }
            if now != was {
                raised.push(format!("{pod} {was:?} → {now:?}m"));
            }
        }
        if quota < burner_quota {
            bail!("{what}: {BURNER}'s cgroup quota fell from {burner_quota:?}m to {quota:?}m");
        }
        Ok(raised)
    };
    let mut done = Vec::new();
    let mut raised = Vec::new();
    for (component, down) in [
        ("kubelet", Duration::from_secs(5)),
        ("containerd", Duration::from_secs(5)),
        ("kube-apiserver", Duration::from_secs(15)),
    ] {
        if c.restart(component, down)? {
            for r in check(&format!("{component} restarted"))? {
                eprintln!("e2e: NOTE: after the {component} restart MBCAS raised {r}");
                raised.push(format!("{r} after {component}"));
            }
            done.push(component);
        } else {
            eprintln!("e2e: SKIP restarting {component}: this cluster cannot");
        }
    }
    report.ok(format!(
        "faults ({}): no limit lost or lowered, no container restarted, {BURNER}'s quota held at {burner_quota:?}m; raised: {}",
        if done.is_empty() { "none possible here".to_owned() } else { done.join(", ") },
        if raised.is_empty() { "none".to_owned() } else { raised.join(", ") }
    ));

    // The daemon itself restarted: its pod deleted, the DaemonSet recreates it.
    // What must hold: nothing lost (allocations, pods), no container restart,
    // no limit below the pod's starting limit, the kernel enforcing the spec.
    // And a restart alone leaves every limit as it was: as it was when the
    // old daemon went, with its last decisions carried out (a node-e2e run
    // failed on a decision the old daemon made after the faults' checks).
    let before = wait_until(
        "the PodAllocations to be Applied before the daemon restart",
        Duration::from_secs(60),
        Duration::from_secs(1),
        || {
            let applied = [BURNER, DUO].iter().all(|n| phase(c, n) == "Applied");
            Ok(if applied { Some(limits_now(c)?) } else { None })
        },
    )?;
    let old_log = c.daemon_log();
    kubectl(
        c,
        &[
            "-n",
            DAEMON_NAMESPACE,
            "delete",
            "pod",
            "-l",
            "app.kubernetes.io/name=mbcas",
            "--wait=true",
        ],
    )?;
    daemon_ready(c).context("MBCAS not ready after its pod was recreated")?;
    // It went on from the decision state its predecessor saved
    // (`--state-file` on a hostPath).
    let restored = match c.metrics() {
        Some(addr) => {
            // Ready before its loop starts (it may wait for the node's lease).
            let n = wait_until(
                "the restarted daemon to take back the saved decision state of the burner and the duo",
                Duration::from_secs(60),
                Duration::from_secs(1),
                || {
                    let text = crate::soak::metrics(addr)?;
                    let n = text
                        .lines()
                        .find_map(|l| l.strip_prefix("mbcas_state_restored_consumers "))
                        .and_then(|v| v.trim().parse::<f64>().ok())
                        .unwrap_or(0.0);
                    Ok((n >= 2.0).then_some(n))
                },
            )?;
            format!(", the decision state of {n} pods taken back from --state-file")
        }
        None => String::new(),
    };
    let mut changed = Vec::new();
    let observe = Instant::now();
    while observe.elapsed() < Duration::from_secs(60) {
        for (now, was) in limits_now(c)?.iter().zip(&before) {
            if now.2 != was.2 {
                bail!("{} restarted after the daemon restart", now.0);
            }
            if now.1 != was.1
                && !changed
                    .iter()
                    .any(|(n, l): &(String, _)| *n == now.0 && *l == now.1)
            {
                changed.push((now.0.clone(), now.1));
            }
        }
        sleep(Duration::from_secs(2));
    }
    // A pod's total, not each container's: a container is sized by its use
    // (the idle sidecar sits below its starting limit by design).
    let now = limits_now(c)?;
    let total = |pod: &str| -> Option<u64> {
        now.iter()
            .filter(|(n, _, _)| n.split('/').next() == Some(pod))
            .map(|(_, l, _)| *l)
            .sum()
    };
    let duo_start: u64 = DUO_LIMITS.iter().map(|(_, l)| l).sum();
    for (pod, start) in [(BURNER, BURNER_LIMIT), (DUO, duo_start)] {
        let limit = total(pod);
        if limit.is_none_or(|l| l < start) {
            bail!(
                "after the daemon restart {pod}'s limit {limit:?}m is below its starting {start}m"
            );
        }
    }
    for name in [BURNER, DUO] {
        if phase(c, name).is_empty() {
            bail!("the PodAllocation of {name} was lost across the daemon restart");
        }
    }
    let quota = cgroup_limit(c, node, burner_dir)?;
    let spec = first(&pod_view(c, NAMESPACE, BURNER)?)?.spec_limit;
    if quota != spec {
        bail!(
            "after the daemon restart {BURNER}'s cgroup enforces {quota:?}m, its spec says {spec:?}m"
        );
    }
    let changes: Vec<String> = changed
        .iter()
        .map(|(n, l)| format!("{n} → {l:?}m"))
        .collect();
    // A restart alone changes no limit (the loads did not change).
    if !changes.is_empty() {
        let decided: Vec<&str> = old_log
            .lines()
            .filter(|l| l.contains("allocation published"))
            .collect();
        bail!(
            "the daemon restart alone changed {} limits in 60 s (from {before:?}): {}; the old daemon's last decisions:\n{}",
            changes.len(),
            changes.join(", "),
            decided.join("\n")
        );
    }
    report.ok(format!(
        "daemon restart: PodAllocations kept, 0 container restarts, no limit changed in the 60 s after it{restored}"
    ));
    Ok(())
}

/// Builds the `mbcas` binary of this checkout (debug, the one the tests use;
/// a no-op when it is fresh) and returns its absolute path: the node's image
/// holds it, and the scenario runs `mbcas restore` with it from this machine.
pub fn build_mbcas() -> anyhow::Result<PathBuf> {
    let exe = crate::host::build_mbcas(false)?;
    std::path::absolute(&exe).with_context(|| format!("absolute path of {}", exe.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotas_v1_and_v2() {
        assert_eq!(parse_quota("30000 100000\n"), Some(Some(300)));
        assert_eq!(parse_quota("max 100000"), Some(None));
        assert_eq!(parse_quota("-1 100000"), Some(None));
        assert_eq!(parse_quota("12345 100000"), Some(Some(124)));
        assert_eq!(parse_quota("x"), None);
        assert_eq!(parse_quota("1 0"), None);
    }

    #[test]
    fn throttled_ratio_of_two_samples() {
        assert!((ratio((10, 5), (110, 55)) - 0.5).abs() < 1e-9);
        assert!(ratio((10, 5), (10, 5)).abs() < 1e-9);
    }

    #[test]
    fn workload_has_the_documented_shapes() {
        let pods = workload("img");
        assert_eq!(pods.len(), 6);
        let g = &pods[2]["spec"]["containers"][0]["resources"];
        assert_eq!(g["requests"]["cpu"], g["limits"]["cpu"]);
        assert_eq!(g["requests"]["memory"], g["limits"]["memory"]);
        assert_eq!(
            pods[3]["spec"]["containers"][0]["resizePolicy"][0]["restartPolicy"],
            "RestartContainer"
        );
        assert_eq!(pods[4]["metadata"]["namespace"], "kube-system");
        assert_eq!(
            pods[1]["spec"]["containers"].as_array().map(Vec::len),
            Some(2)
        );
        // The limitless pod: a request, no CPU limit (a memory limit only).
        let l = &pods[5]["spec"]["containers"][0]["resources"];
        assert_eq!(l["requests"]["cpu"], "50m");
        assert!(l["limits"]["cpu"].is_null() && !l["limits"]["memory"].is_null());
        // The holder: Guaranteed, on the node it is given.
        let h = holder("img", "n1", 1300);
        let r = &h["spec"]["containers"][0]["resources"];
        assert_eq!(r["requests"], r["limits"]);
        assert_eq!(h["spec"]["nodeName"], "n1");
    }
}
