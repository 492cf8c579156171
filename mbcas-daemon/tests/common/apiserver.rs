//! The control-plane test tier: a real etcd + kube-apiserver (+ a
//! kube-controller-manager for ServiceAccounts, namespace deletion and
//! ownerReference garbage collection), started by `cargo xtask testenv up`.
//!
//! ```ignore
//! let Some(env) = TestEnv::get() else { return };   // skipped loudly; panics in CI
//! let client = env.client().await;
//! let ns = TestNamespace::new(env, &client, "writer").await;  // deleted on drop
//! let node = TestNode::new(env, &client, "writer", MilliCpu(4000)).await; // 4 CPUs allocatable
//! let sa_client = env.service_account_client(&ns.name, "mbcas").await;
//! ```
//!
//! Where the environment comes from, in order:
//! 1. `MBCAS_TESTENV_KUBECONFIG` (set by `cargo xtask test`, which also stops it);
//! 2. otherwise `xtask testenv up --no-build`, run from the xtask binary next to
//!    this test binary: it reuses a running environment or starts one from the
//!    cached binaries, and leaves it running for later test runs
//!    (`cargo xtask testenv down` stops it). It never builds Kubernetes.
//!
//! If neither works the tier is skipped with a message, except when `CI` is
//! set: then it fails.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::{
        OnceLock,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use k8s_openapi::{
    api::core::v1::{Namespace, Node, Pod, ServiceAccount},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, Client, Config,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
};
use mbcas::{config::parse_cpu, units::MilliCpu};

/// The environment variable `cargo xtask test` sets to the admin kubeconfig.
pub const KUBECONFIG_ENV: &str = "MBCAS_TESTENV_KUBECONFIG";

/// A running test control plane.
#[derive(Debug)]
pub struct TestEnv {
    /// The admin kubeconfig (user in `system:masters`).
    pub kubeconfig: PathBuf,
}

static ENV: OnceLock<Option<TestEnv>> = OnceLock::new();

impl TestEnv {
    /// The shared environment for this test binary, or `None` (after saying
    /// why on stderr) when there is none and `CI` is not set.
    pub fn get() -> Option<&'static TestEnv> {
        ENV.get_or_init(|| match locate() {
            Ok(kubeconfig) => Some(TestEnv { kubeconfig }),
            Err(why) => {
                assert!(
                    std::env::var_os("CI").is_none(),
                    "control-plane test tier cannot run in CI: {why}"
                );
                eprintln!("SKIP (control-plane tier): {why}");
                None
            }
        })
        .as_ref()
    }

    /// The admin client configuration.
    pub async fn config(&self) -> Config {
        let kc = Kubeconfig::read_from(&self.kubeconfig)
            .unwrap_or_else(|e| panic!("read {}: {e}", self.kubeconfig.display()));
        Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .unwrap_or_else(|e| panic!("kubeconfig {}: {e}", self.kubeconfig.display()))
    }

    /// A client with full rights (`system:masters`). Build one per test: a
    /// client belongs to the tokio runtime it was made in.
    pub async fn client(&self) -> Client {
        Client::try_from(self.config().await).unwrap_or_else(|e| panic!("kube client: {e}"))
    }

    /// A client that impersonates `user` in `groups` (the admin may impersonate
    /// anyone): requests are authorized by RBAC as that user.
    pub async fn impersonating_client(&self, user: &str, groups: &[&str]) -> Client {
        let mut config = self.config().await;
        config.auth_info.impersonate = Some(user.to_owned());
        config.auth_info.impersonate_groups =
            Some(groups.iter().map(|g| (*g).to_owned()).collect());
        Client::try_from(config).unwrap_or_else(|e| panic!("kube client as {user}: {e}"))
    }

    /// A client acting as ServiceAccount `namespace/name`, with the groups the
    /// apiserver gives a real ServiceAccount token.
    pub async fn service_account_client(&self, namespace: &str, name: &str) -> Client {
        let ns_group = format!("system:serviceaccounts:{namespace}");
        self.impersonating_client(
            &format!("system:serviceaccount:{namespace}:{name}"),
            &["system:serviceaccounts", &ns_group, "system:authenticated"],
        )
        .await
    }

    /// The cached kubectl, pointed at this environment (for debugging output).
    pub fn kubectl(&self) -> Command {
        let mut cmd = Command::new(kubectl_path());
        cmd.arg("--kubeconfig").arg(&self.kubeconfig);
        cmd
    }
}

fn kubectl_path() -> PathBuf {
    let cache = std::env::var_os("MBCAS_TESTENV_CACHE_DIR").map_or_else(
        || {
            std::env::var_os("HOME")
                .map_or_else(|| PathBuf::from("/root"), PathBuf::from)
                .join(".cache/mbcas")
        },
        PathBuf::from,
    );
    cache.join("bin/kubectl-v1.35.4")
}

/// The xtask binary next to this test binary (`target/<profile>/xtask`).
fn xtask_binary() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    exe.parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("xtask"))
        .filter(|p| p.is_file())
        .ok_or_else(|| {
            format!(
                "no xtask binary next to {} (build it: `cargo build -p xtask`)",
                exe.display()
            )
        })
}

/// Runs `xtask testenv ARGS`; returns its stdout, or why it failed.
fn xtask_testenv(args: &[&str]) -> Result<String, String> {
    let xtask = xtask_binary()?;
    let out = Command::new(&xtask)
        .arg("testenv")
        .args(args)
        .output()
        .map_err(|e| format!("run {}: {e}", xtask.display()))?;
    if !out.status.success() {
        return Err(format!(
            "`xtask testenv {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A control plane of its own (own etcd, ports, certificates, state
/// directory `target/testenv-<tag>-<pid>`), for tests that break it: kill and
/// restart the API server without disturbing the shared one. Stopped and
/// removed on drop. Starting one takes about 5 s.
pub struct PrivateEnv {
    pub env: TestEnv,
    state_dir: PathBuf,
}

impl PrivateEnv {
    /// Starts it from the cached binaries, or `None` (after saying why) when
    /// that is impossible and `CI` is not set; in CI it panics instead.
    pub fn start(tag: &str) -> Option<Self> {
        let state_dir = xtask_binary().and_then(|x| {
            x.parent()
                .and_then(Path::parent)
                .map(|target| target.join(format!("testenv-{tag}-{}", std::process::id())))
                .ok_or_else(|| format!("no target directory above {}", x.display()))
        });
        let started = state_dir.and_then(|dir| {
            let d = dir.display().to_string();
            let out = xtask_testenv(&["--state-dir", &d, "up", "--no-build"])?;
            let kubeconfig = out
                .lines()
                .last()
                .map(PathBuf::from)
                .filter(|p| p.is_file())
                .ok_or_else(|| format!("`xtask testenv up` printed no kubeconfig path: {out}"))?;
            Ok((dir, kubeconfig))
        });
        match started {
            Ok((state_dir, kubeconfig)) => Some(Self {
                env: TestEnv { kubeconfig },
                state_dir,
            }),
            Err(why) => {
                assert!(
                    std::env::var_os("CI").is_none(),
                    "control-plane test tier cannot run in CI: {why}"
                );
                eprintln!("SKIP (control-plane tier, private environment): {why}");
                None
            }
        }
    }

    fn component(&self, verb: &str, component: &str) {
        let d = self.state_dir.display().to_string();
        xtask_testenv(&["--state-dir", &d, verb, component])
            .unwrap_or_else(|e| panic!("{verb} {component}: {e}"));
    }

    /// SIGKILLs the kube-apiserver (etcd and the controller-manager keep running).
    pub fn kill_apiserver(&self) {
        self.component("kill", "kube-apiserver");
    }

    /// Starts the kube-apiserver again (same port, certificates and data) and
    /// waits for `/readyz`.
    pub fn restart_apiserver(&self) {
        self.component("start", "kube-apiserver");
    }
}

impl Drop for PrivateEnv {
    fn drop(&mut self) {
        let d = self.state_dir.display().to_string();
        if let Err(e) = xtask_testenv(&["--state-dir", &d, "down"]) {
            eprintln!("cleanup of the private control plane {d} failed: {e}");
            return;
        }
        let _ = std::fs::remove_dir_all(&self.state_dir);
        let mut lock = self.state_dir.clone().into_os_string();
        lock.push(".lock");
        let _ = std::fs::remove_file(lock);
    }
}

fn locate() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os(KUBECONFIG_ENV) {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(format!(
                "{KUBECONFIG_ENV}={} does not exist",
                path.display()
            ))
        };
    }
    // Not set: start (or reuse) the default one from the cached binaries.
    let stdout = xtask_testenv(&["up", "--no-build"]).map_err(|e| {
        format!(
            "{KUBECONFIG_ENV} is not set and {e}; run `cargo xtask testenv up` and export \
             {KUBECONFIG_ENV}, or use `cargo xtask test`"
        )
    })?;
    let path = stdout
        .lines()
        .last()
        .map(PathBuf::from)
        .filter(|p| p.is_file())
        .ok_or_else(|| format!("`xtask testenv up` printed no kubeconfig path: {stdout}"))?;
    eprintln!(
        "control-plane tier: using {} (left running; stop it with `cargo xtask testenv down`)",
        path.display()
    );
    Ok(path)
}

/// A name no other test (or earlier run) uses: `mbcas-test-<tag>-<pid>-<n><t>`.
pub fn unique_name(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_micros() % 10_000);
    format!(
        "mbcas-test-{tag}-{}-{}{t}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Polls `check` every 200 ms until it returns `Some`, panicking after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Runs `cleanup` on a fresh thread with its own runtime and client: works
/// from `Drop`, even while the test's runtime is unwinding a panic. Failures
/// are reported on stderr, never raised.
fn cleanup_in_background<F, Fut>(config: Config, what: String, cleanup: F)
where
    F: FnOnce(Client) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<(), kube::Error>>,
{
    let joined = std::thread::spawn(move || -> Result<(), String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(async {
            let client = Client::try_from(config).map_err(|e| e.to_string())?;
            match cleanup(client).await {
                Ok(()) => Ok(()),
                Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
                Err(e) => Err(e.to_string()),
            }
        })
    })
    .join();
    match joined {
        Ok(Ok(())) => {}
        Ok(Err(e)) => eprintln!("cleanup of {what} failed: {e}"),
        Err(_) => eprintln!("cleanup of {what}: thread panicked"),
    }
}

/// A namespace for one test, deleted (with everything in it) on drop, even
/// when the test panics. `new` waits until its `default` ServiceAccount
/// exists, so pods can be created right away.
pub struct TestNamespace {
    pub name: String,
    config: Config,
}

impl TestNamespace {
    pub async fn new(env: &TestEnv, client: &Client, tag: &str) -> Self {
        let name = unique_name(tag);
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some([("mbcas.io/test".to_owned(), tag.to_owned())].into()),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .unwrap_or_else(|e| panic!("create namespace {name}: {e}"));
        let guard = Self {
            name: name.clone(),
            config: env.config().await,
        };
        let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), &name);
        eventually(
            &format!("ServiceAccount {name}/default (kube-controller-manager)"),
            Duration::from_secs(60),
            || async { sas.get_opt("default").await.ok().flatten() },
        )
        .await;
        guard
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        let name = self.name.clone();
        cleanup_in_background(
            self.config.clone(),
            format!("namespace {name}"),
            |client| async move {
                // No kubelet confirms pod deletion here: delete pods at once, or
                // they (and the namespace) would stay Terminating for ever.
                Api::<Pod>::namespaced(client.clone(), &name)
                    .delete_collection(
                        &DeleteParams::default().grace_period(0),
                        &ListParams::default(),
                    )
                    .await?;
                Api::<Namespace>::all(client)
                    .delete(&name, &DeleteParams::background())
                    .await
                    .map(drop)
            },
        );
    }
}

/// A Node object (no kubelet behind it) with the given allocatable CPU,
/// deleted on drop. Pods bound to it with `spec.nodeName` stay Pending, which
/// is all the API server needs for resize, writer and RBAC tests.
pub struct TestNode {
    pub name: String,
    config: Config,
}

impl TestNode {
    pub async fn new(env: &TestEnv, client: &Client, tag: &str, allocatable: MilliCpu) -> Self {
        let name = unique_name(tag);
        let nodes: Api<Node> = Api::all(client.clone());
        let node = Node {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some(
                    [
                        ("mbcas.io/test".to_owned(), tag.to_owned()),
                        ("kubernetes.io/hostname".to_owned(), name.clone()),
                    ]
                    .into(),
                ),
                ..ObjectMeta::default()
            },
            ..Node::default()
        };
        nodes
            .create(&PostParams::default(), &node)
            .await
            .unwrap_or_else(|e| panic!("create node {name}: {e}"));
        let guard = Self {
            name: name.clone(),
            config: env.config().await,
        };
        let cpu = format!("{}m", allocatable.get());
        let status = serde_json::json!({
            "status": {
                "capacity": { "cpu": cpu, "memory": "64Gi", "pods": "110" },
                "allocatable": { "cpu": cpu, "memory": "64Gi", "pods": "110" },
                "conditions": [{ "type": "Ready", "status": "True", "reason": "MbcasTest",
                                 "message": "fake node for tests" }],
            }
        });
        let patched = nodes
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .unwrap_or_else(|e| panic!("set status of node {name}: {e}"));
        let got = patched
            .status
            .and_then(|s| s.allocatable)
            .and_then(|a| a.get("cpu").and_then(|q| parse_cpu(&q.0).ok()));
        assert_eq!(
            got,
            Some(allocatable),
            "node {name}: allocatable cpu not stored"
        );
        guard
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        let name = self.name.clone();
        cleanup_in_background(
            self.config.clone(),
            format!("node {name}"),
            |client| async move {
                // The node's lease, wherever a test's daemons took it (the
                // harness's `default`, the RBAC tests' `mbcas-system`).
                for ns in ["default", "mbcas-system"] {
                    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
                        Api::namespaced(client.clone(), ns);
                    match leases
                        .delete(
                            &mbcas::k8s::lease::lease_name(&name),
                            &DeleteParams::default(),
                        )
                        .await
                    {
                        Ok(_) | Err(kube::Error::Api(_)) => {}
                        Err(e) => return Err(e),
                    }
                }
                Api::<Node>::all(client)
                    .delete(&name, &DeleteParams::default())
                    .await
                    .map(drop)
            },
        );
    }
}
