//! `cargo xtask testenv build | up | down | status | kubectl -- ARGS`: a real
//! Kubernetes control plane on loopback for the control-plane test tier.
//!
//! * `build`: build etcd, kube-apiserver, kube-controller-manager, kubectl,
//!   and the node's kubelet, kube-scheduler and containerd from their Go
//!   modules with the machine's Go toolchain, only when the versioned binaries
//!   are not already cached under `~/.cache/mbcas/bin/`.
//! * `up`: start etcd, kube-apiserver (random free ports, generated
//!   certificates, a static admin token, RBAC) and a kube-controller-manager
//!   running only the service-account, namespace and garbage-collector
//!   controllers; wait until `/readyz` is ok and the `default` ServiceAccount
//!   exists; write an admin kubeconfig to `target/testenv/kubeconfig` and print
//!   its path. Idempotent: when already up it says so. `--with-node` also
//!   starts a real node ([`node`]): containerd, kubelet, kube-scheduler.
//! * `down`: stop exactly the processes `up` started (their pid and command
//!   line are recorded) and remove the etcd data and credentials.
//! * `kubectl -- ARGS`: the cached kubectl with the test environment's kubeconfig.
//!
//! Everything lives in `target/testenv/`: `kubeconfig`, `pids`, `logs/`,
//! `pki/`, `data/`. Logs are kept after `down` for post-mortems.

use std::{
    fs::{self, File},
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use crate::cmd::{output_of, run_cmd};

pub mod node;

/// The Kubernetes release (kube-apiserver, kube-controller-manager, kubectl).
pub const KUBERNETES_VERSION: &str = "v1.35.4";
/// The etcd release (server module `go.etcd.io/etcd/server/v3`).
pub const ETCD_VERSION: &str = "v3.6.16";
/// The environment variable through which tests receive the kubeconfig.
pub const KUBECONFIG_ENV: &str = "MBCAS_TESTENV_KUBECONFIG";

const SERVICE_CIDR: &str = "10.0.0.0/24";
const KUBE_COMMANDS: &[&str] = &[
    "kube-apiserver",
    "kube-controller-manager",
    "kubectl",
    "kubelet",
    "kube-scheduler",
];
const READY_TIMEOUT: Duration = Duration::from_secs(180);

#[derive(Debug, clap::Args)]
pub struct Options {
    /// Where this environment keeps its state (default `target/testenv`): a
    /// second directory gives a second, independent control plane.
    #[arg(long, global = true, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Sub,
}

#[derive(Debug, clap::Subcommand)]
pub enum Sub {
    /// Build and cache etcd, kube-apiserver, kube-controller-manager, kubectl, kubelet,
    /// kube-scheduler and containerd (only when missing).
    Build,
    /// Start the control plane on loopback (building first if needed); print the kubeconfig path.
    Up {
        /// Fail instead of building when the binaries are not cached.
        #[arg(long)]
        no_build: bool,
        /// Also start a real node (containerd, kubelet, kube-scheduler) that
        /// runs pods in real cgroups; needs root. On an environment already up,
        /// adds the node.
        #[arg(long)]
        with_node: bool,
    },
    /// Stop the processes `up` started and remove their data.
    Down,
    /// Say whether the test environment is up, and where its kubeconfig is.
    Status,
    /// Run the cached kubectl against the test environment: `cargo xtask testenv kubectl -- get pods -A`.
    Kubectl {
        /// Arguments passed to kubectl.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Fault injection: SIGKILL one component (etcd, kube-apiserver, kube-controller-manager;
    /// with the node: containerd, kubelet, kube-scheduler).
    Kill {
        /// The component, as named in the state directory's `pids` file.
        component: String,
    },
    /// Start again a component stopped by `kill`, with the same flags, ports
    /// and data; waits until it is ready (kube-apiserver: `/readyz`).
    Start {
        /// The component, as named in the state directory's `pids` file.
        component: String,
    },
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    let state = StateDir::new(opts.state_dir.as_deref());
    match &opts.command {
        Sub::Build => ensure_built().map(|_| ()),
        Sub::Up {
            no_build,
            with_node,
        } => {
            let (kubeconfig, _) = up_in(&state, !no_build, *with_node)?;
            println!("{}", kubeconfig.display());
            Ok(())
        }
        Sub::Down => down_in(&state),
        Sub::Kill { component } => kill_component(&state, component),
        Sub::Start { component } => start_component(&state, component),
        Sub::Status => {
            if is_up(&state) {
                println!("up: {}", state.kubeconfig().display());
                if node::is_up(&state) {
                    let health = if node::kubelet_healthy(&state) {
                        "kubelet healthz ok"
                    } else {
                        "kubelet healthz not answering"
                    };
                    println!("node {}: up ({health})", node::NODE_NAME);
                } else if node::NodeDir::new(&state).exists() {
                    println!("node {}: down (leftovers: run `down`)", node::NODE_NAME);
                }
            } else {
                println!("down");
            }
            Ok(())
        }
        Sub::Kubectl { args } => {
            if !is_up(&state) {
                bail!("the test environment is not up: run `cargo xtask testenv up` first");
            }
            let bins = Binaries::cached();
            let status = Command::new(&bins.kubectl)
                .arg("--kubeconfig")
                .arg(state.kubeconfig())
                .args(args)
                .status()
                .with_context(|| format!("failed to start {}", bins.kubectl.display()))?;
            if !status.success() {
                bail!("kubectl {}: {status}", args.join(" "));
            }
            Ok(())
        }
    }
}

// ---------------------------------------------------------------------------
// Building and caching the binaries

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// `$MBCAS_TESTENV_CACHE_DIR`, else `~/.cache/mbcas`.
fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("MBCAS_TESTENV_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    home.join(".cache/mbcas")
}

/// The cached, versioned binaries.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub etcd: PathBuf,
    pub apiserver: PathBuf,
    pub controller_manager: PathBuf,
    pub kubectl: PathBuf,
    /// The node's kubelet and the scheduler that places pods on it (`--with-node`).
    pub kubelet: PathBuf,
    pub scheduler: PathBuf,
}

impl Binaries {
    pub fn cached() -> Self {
        let bin = cache_dir().join("bin");
        Self {
            etcd: bin.join(format!("etcd-{ETCD_VERSION}")),
            apiserver: bin.join(format!("kube-apiserver-{KUBERNETES_VERSION}")),
            controller_manager: bin.join(format!("kube-controller-manager-{KUBERNETES_VERSION}")),
            kubectl: bin.join(format!("kubectl-{KUBERNETES_VERSION}")),
            kubelet: bin.join(format!("kubelet-{KUBERNETES_VERSION}")),
            scheduler: bin.join(format!("kube-scheduler-{KUBERNETES_VERSION}")),
        }
    }

    fn kube_present(&self) -> bool {
        [
            &self.apiserver,
            &self.controller_manager,
            &self.kubectl,
            &self.kubelet,
            &self.scheduler,
        ]
        .iter()
        .all(|p| p.is_file())
    }
}

/// Builds whatever is not cached yet; returns the binaries.
pub fn ensure_built() -> anyhow::Result<Binaries> {
    let bins = Binaries::cached();
    if bins.kube_present() {
        eprintln!("testenv: Kubernetes {KUBERNETES_VERSION} binaries cached");
    } else {
        build_kubernetes(&bins)?;
    }
    if bins.etcd.is_file() {
        eprintln!("testenv: etcd {ETCD_VERSION} cached");
    } else {
        build_etcd(&bins)?;
    }
    let nbins = node::NodeBinaries::cached();
    if nbins.present() {
        eprintln!("testenv: containerd {} cached", node::CONTAINERD_VERSION);
    } else {
        node::build(&nbins)?;
    }
    Ok(bins)
}

fn go_binary() -> anyhow::Result<PathBuf> {
    if output_of(Command::new("go").arg("version")).is_some() {
        return Ok(PathBuf::from("go"));
    }
    let fallback = PathBuf::from("/usr/local/go/bin/go");
    if fallback.is_file() {
        return Ok(fallback);
    }
    bail!(
        "the control-plane test environment is built with Go, and `go` is not on PATH \
         (nor /usr/local/go/bin/go); install Go >= 1.26 and run it again"
    )
}

/// `go` with the module and build caches under the MBCAS cache directory.
fn go(dir: &Path) -> anyhow::Result<Command> {
    let mut cmd = Command::new(go_binary()?);
    let cache = cache_dir().join("go");
    cmd.current_dir(dir)
        .env("GOMODCACHE", cache.join("mod"))
        .env("GOCACHE", cache.join("build"))
        .env("GOTOOLCHAIN", "local");
    Ok(cmd)
}

/// Downloads `module@version` and returns the path of its go.mod.
fn download_go_mod(dir: &Path, module: &str, version: &str) -> anyhow::Result<PathBuf> {
    let out = go(dir)?
        .args(["mod", "download", "-json", &format!("{module}@{version}")])
        .output()
        .context("failed to run go mod download")?;
    if !out.status.success() {
        bail!(
            "go mod download {module}@{version} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("go mod download {module}@{version}: bad JSON"))?;
    v["GoMod"]
        .as_str()
        .map(PathBuf::from)
        .with_context(|| format!("go mod download {module}@{version}: no GoMod in its output"))
}

/// The `go` and `godebug` lines of a go.mod, to repeat in the wrapper module.
fn go_directives(go_mod: &str) -> String {
    go_mod
        .lines()
        .filter(|l| l.starts_with("go ") || l.starts_with("godebug "))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// The modules Kubernetes' go.mod replaces by its own `./staging/` copies.
fn staging_modules(go_mod: &str) -> Vec<String> {
    go_mod
        .lines()
        .map(|l| l.trim().trim_start_matches("replace").trim())
        .filter_map(|l| {
            let (module, target) = l.split_once("=>")?;
            target
                .trim()
                .starts_with("./staging/")
                .then(|| module.trim().to_owned())
        })
        .collect()
}

/// `v1.35.4` → `v0.35.4`, the version of the published staging modules.
fn staging_version(kubernetes: &str) -> anyhow::Result<String> {
    kubernetes
        .strip_prefix("v1.")
        .map(|rest| format!("v0.{rest}"))
        .with_context(|| format!("unexpected Kubernetes version {kubernetes}"))
}

/// The wrapper module that builds `k8s.io/kubernetes` commands against the
/// published staging modules.
fn kubernetes_wrapper_go_mod(upstream: &str, version: &str) -> anyhow::Result<String> {
    let staging = staging_modules(upstream);
    if staging.is_empty() {
        bail!("k8s.io/kubernetes {version}: no ./staging/ replace directive in its go.mod");
    }
    let staging_version = staging_version(version)?;
    let mut out = format!(
        "module mbcas.io/testenv/kubernetes\n\n{}\nrequire k8s.io/kubernetes {version}\n\nreplace (\n",
        go_directives(upstream)
    );
    for m in &staging {
        out.push_str(&format!("\t{m} => {m} {staging_version}\n"));
    }
    out.push_str(")\n");
    Ok(out)
}

fn tools_go(imports: &[String]) -> String {
    let mut out = String::from("//go:build tools\n\npackage tools\n\nimport (\n");
    for i in imports {
        out.push_str(&format!("\t_ \"{i}\"\n"));
    }
    out.push_str(")\n");
    out
}

fn install(built: &Path, dest: &Path) -> anyhow::Result<()> {
    if let Some(parent) = dest.parent() {
        fs::create_dir_all(parent).with_context(|| format!("mkdir {}", parent.display()))?;
    }
    fs::rename(built, dest)
        .with_context(|| format!("move {} to {}", built.display(), dest.display()))
}

fn build_kubernetes(bins: &Binaries) -> anyhow::Result<()> {
    let started = Instant::now();
    let dir = cache_dir().join(format!("build/kubernetes-{KUBERNETES_VERSION}"));
    fs::create_dir_all(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
    eprintln!(
        "testenv: building kube-apiserver, kube-controller-manager, kubectl, kubelet and \
         kube-scheduler {KUBERNETES_VERSION} in {} (first time only; about 10-15 minutes on 2 cores)",
        dir.display()
    );
    let go_mod_path = download_go_mod(&dir, "k8s.io/kubernetes", KUBERNETES_VERSION)?;
    let upstream = fs::read_to_string(&go_mod_path)
        .with_context(|| format!("read {}", go_mod_path.display()))?;
    let wrapper = kubernetes_wrapper_go_mod(&upstream, KUBERNETES_VERSION)?;
    fs::write(dir.join("go.mod"), wrapper).context("write wrapper go.mod")?;
    let imports: Vec<String> = KUBE_COMMANDS
        .iter()
        .map(|c| format!("k8s.io/kubernetes/cmd/{c}"))
        .collect();
    fs::write(dir.join("tools.go"), tools_go(&imports)).context("write tools.go")?;
    run_cmd(go(&dir)?.args(["mod", "tidy"]))?;
    let staging_version = staging_version(KUBERNETES_VERSION)?;
    let minor = KUBERNETES_VERSION.split('.').nth(1).unwrap_or("0");
    let ldflags = format!(
        "-X k8s.io/component-base/version.gitVersion={KUBERNETES_VERSION} \
         -X k8s.io/component-base/version.gitMajor=1 \
         -X k8s.io/component-base/version.gitMinor={minor} \
         -X k8s.io/client-go/pkg/version.gitVersion={staging_version}"
    );
    let out = dir.join("out");
    run_cmd(
        go(&dir)?
            .args(["build", "-ldflags", &ldflags, "-o"])
            .arg(format!("{}/", out.display()))
            .args(&imports),
    )?;
    install(&out.join("kube-apiserver"), &bins.apiserver)?;
    install(
        &out.join("kube-controller-manager"),
        &bins.controller_manager,
    )?;
    install(&out.join("kubectl"), &bins.kubectl)?;
    install(&out.join("kubelet"), &bins.kubelet)?;
    install(&out.join("kube-scheduler"), &bins.scheduler)?;
    eprintln!(
        "testenv: Kubernetes {KUBERNETES_VERSION} built in {:.0?}",
        started.elapsed()
    );
    Ok(())
}

fn build_etcd(bins: &Binaries) -> anyhow::Result<()> {
    const MODULE: &str = "go.etcd.io/etcd/server/v3";
    let started = Instant::now();
    let dir = cache_dir().join(format!("build/etcd-{ETCD_VERSION}"));
    fs::create_dir_all(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
    eprintln!(
        "testenv: building etcd {ETCD_VERSION} in {} (first time only)",
        dir.display()
    );
    let go_mod_path = download_go_mod(&dir, MODULE, ETCD_VERSION)?;
    let upstream = fs::read_to_string(&go_mod_path)
        .with_context(|| format!("read {}", go_mod_path.display()))?;
    fs::write(
        dir.join("go.mod"),
        format!(
            "module mbcas.io/testenv/etcd\n\n{}\nrequire {MODULE} {ETCD_VERSION}\n",
            go_directives(&upstream)
        ),
    )
    .context("write wrapper go.mod")?;
    fs::write(dir.join("tools.go"), tools_go(&[MODULE.to_owned()])).context("write tools.go")?;
    run_cmd(go(&dir)?.args(["mod", "tidy"]))?;
    let out = dir.join("out/etcd");
    run_cmd(go(&dir)?.args(["build", "-o"]).arg(&out).arg(MODULE))?;
    install(&out, &bins.etcd)?;
    eprintln!(
        "testenv: etcd {ETCD_VERSION} built in {:.0?}",
        started.elapsed()
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// Running the control plane

/// `target/testenv/` and what lives in it.
struct StateDir {
    root: PathBuf,
}

impl StateDir {
    fn new(dir: Option<&Path>) -> Self {
        let root = dir.map_or_else(
            || workspace_root().join("target/testenv"),
            Path::to_path_buf,
        );
        // Absolute, so the kubeconfig and the recorded flags work from anywhere.
        let root = std::path::absolute(&root).unwrap_or(root);
        Self { root }
    }
    fn args(&self, name: &str) -> PathBuf {
        self.root.join(format!("{name}.args"))
    }
    fn kubeconfig(&self) -> PathBuf {
        self.root.join("kubeconfig")
    }
    fn pids(&self) -> PathBuf {
        self.root.join("pids")
    }
    fn logs(&self) -> PathBuf {
        self.root.join("logs")
    }
    fn pki(&self) -> PathBuf {
        self.root.join("pki")
    }
    fn data(&self) -> PathBuf {
        self.root.join("data")
    }
}

/// One process `up` started: its name, pid and the executable it ran.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Started {
    name: String,
    pid: i32,
    exe: PathBuf,
}

fn parse_pids(text: &str) -> Vec<Started> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.splitn(3, ' ');
            let name = it.next()?.to_owned();
            let pid = it.next()?.parse().ok()?;
            let exe = PathBuf::from(it.next()?);
            Some(Started { name, pid, exe })
        })
        .collect()
}

fn read_pids(state: &StateDir) -> Vec<Started> {
    fs::read_to_string(state.pids())
        .map(|t| parse_pids(&t))
        .unwrap_or_default()
}

fn record_pid(state: &StateDir, s: &Started) -> anyhow::Result<()> {
    let mut f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(state.pids())
        .with_context(|| format!("open {}", state.pids().display()))?;
    writeln!(f, "{} {} {}", s.name, s.pid, s.exe.display())
        .with_context(|| format!("write {}", state.pids().display()))
}

/// Whether `pid` is alive (not a zombie) and still runs `exe`: the check that
/// keeps us from signalling a process we did not start.
fn runs(pid: i32, exe: &Path) -> bool {
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    let zombie = fs::read_to_string(proc_dir.join("stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(true);
    if zombie {
        return false;
    }
    fs::read(proc_dir.join("cmdline")).is_ok_and(|c| {
        c.split(|b| *b == 0)
            .next()
            .is_some_and(|argv0| argv0 == exe.as_os_str().as_encoded_bytes())
    })
}

fn is_up(state: &StateDir) -> bool {
    let pids = read_pids(state);
    !pids.is_empty() && pids.iter().all(|s| runs(s.pid, &s.exe)) && state.kubeconfig().is_file()
}

/// SIGTERM, wait up to 10 s, then SIGKILL; only if `s.pid` still runs `s.exe`.
fn stop(s: &Started) {
    if !runs(s.pid, &s.exe) {
        return;
    }
    let pid = Pid::from_raw(s.pid);
    let _ = kill(pid, Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if !runs(s.pid, &s.exe) {
            eprintln!("testenv: stopped {} (pid {})", s.name, s.pid);
            return;
        }
        sleep(Duration::from_millis(100));
    }
    if runs(s.pid, &s.exe) {
        let _ = kill(pid, Signal::SIGKILL);
        eprintln!("testenv: killed {} (pid {})", s.name, s.pid);
    }
}

/// A lock around `up` and `down` so two of them never interleave.
fn lock(state: &StateDir) -> anyhow::Result<File> {
    let mut path = state.root.clone().into_os_string();
    path.push(".lock");
    let path = PathBuf::from(path);
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).with_context(|| format!("mkdir {}", parent.display()))?;
    }
    let f = File::create(&path).with_context(|| format!("create {}", path.display()))?;
    f.lock()
        .with_context(|| format!("lock {}", path.display()))?;
    Ok(f)
}

/// The order in which `down` stops the components.
const STOP_ORDER: &[&str] = &[
    "kube-scheduler",
    "kubelet",
    "containerd",
    "kube-controller-manager",
    "kube-apiserver",
    "etcd",
];

fn stop_all(state: &StateDir) -> anyhow::Result<()> {
    // The node's scheduler, kubelet and containerd, then controller-manager,
    // apiserver and etcd, whatever order restarts left in the pids file.
    let mut pids = read_pids(state);
    pids.sort_by_key(|s| {
        STOP_ORDER
            .iter()
            .position(|n| *n == s.name)
            .unwrap_or(STOP_ORDER.len())
    });
    for s in &pids {
        stop(s);
    }
    let node_result = if node::NodeDir::new(state).exists() {
        node::clean_up(state)
    } else {
        Ok(())
    };
    for s in read_pids(state) {
        let _ = fs::remove_file(state.args(&s.name));
    }
    for p in [state.pids(), state.kubeconfig()] {
        if p.exists() {
            fs::remove_file(&p).with_context(|| format!("remove {}", p.display()))?;
        }
    }
    for d in [state.data(), state.pki()] {
        if d.exists() {
            fs::remove_dir_all(&d).with_context(|| format!("remove {}", d.display()))?;
        }
    }
    node_result
}

/// Stops the default test environment; a no-op when it is not up.
pub fn down() -> anyhow::Result<()> {
    down_in(&StateDir::new(None))
}

fn down_in(state: &StateDir) -> anyhow::Result<()> {
    let _lock = lock(state)?;
    stop_all(state)?;
    eprintln!("testenv: down");
    Ok(())
}

/// `N` distinct free TCP ports on loopback (the kernel's pick; all held until
/// all are chosen, then released for the caller to use).
fn free_ports<const N: usize>() -> anyhow::Result<[u16; N]> {
    let mut held = Vec::with_capacity(N);
    let mut ports = [0; N];
    for port in &mut ports {
        let l = TcpListener::bind("127.0.0.1:0").context("bind 127.0.0.1:0")?;
        *port = l.local_addr().context("local_addr")?.port();
        held.push(l);
    }
    Ok(ports)
}

fn random_hex(bytes: usize) -> anyhow::Result<String> {
    let mut buf = vec![0_u8; bytes];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .context("read /dev/urandom")?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

fn openssl(pki: &Path, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(pki)
        .output()
        .context("failed to run openssl (install it: apt-get install openssl)")?;
    if !out.status.success() {
        bail!(
            "openssl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// CA, serving certificate for 127.0.0.1/localhost, service-account key.
fn generate_pki(pki: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(pki).with_context(|| format!("mkdir {}", pki.display()))?;
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];
    let mut ca = vec!["req", "-x509", "-nodes", "-days", "3650"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-subj",
        "/CN=mbcas-testenv-ca",
    ]);
    openssl(pki, &ca)?;
    let mut csr = vec!["req", "-nodes"];
    csr.extend(ec);
    csr.extend([
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=kube-apiserver",
    ]);
    openssl(pki, &csr)?;
    fs::write(
        pki.join("server.ext"),
        "basicConstraints=critical,CA:FALSE\n\
         keyUsage=critical,digitalSignature,keyEncipherment\n\
         extendedKeyUsage=serverAuth\n\
         subjectAltName=IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,\
         DNS:kubernetes.default,DNS:kubernetes.default.svc\n",
    )
    .context("write server.ext")?;
    openssl(
        pki,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "3650",
            "-extfile",
            "server.ext",
            "-out",
            "server.crt",
        ],
    )?;
    openssl(
        pki,
        &[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            "sa.key",
        ],
    )?;
    openssl(pki, &["pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub"])
}

fn kubeconfig_yaml(port: u16, ca: &Path, token: &str) -> String {
    format!(
        "apiVersion: v1\n\
         kind: Config\n\
         clusters:\n\
         - name: mbcas-testenv\n  cluster:\n    server: https://127.0.0.1:{port}\n    certificate-authority: {}\n\
         users:\n\
         - name: admin\n  user:\n    token: {token}\n\
         contexts:\n\
         - name: mbcas-testenv\n  context:\n    cluster: mbcas-testenv\n    user: admin\n\
         current-context: mbcas-testenv\n",
        ca.display()
    )
}

fn log_tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn spawn(
    state: &StateDir,
    name: &str,
    exe: &Path,
    args: &[String],
) -> anyhow::Result<(Started, Child)> {
    let saved = serde_json::to_string(args).context("serialize flags")?;
    fs::write(state.args(name), saved)
        .with_context(|| format!("write {}", state.args(name).display()))?;
    let log_path = state.logs().join(format!("{name}.log"));
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("create {}", log_path.display()))?;
    let log2 = log
        .try_clone()
        .with_context(|| format!("dup {}", log_path.display()))?;
    let child = Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        // Own process group: a Ctrl-C meant for cargo does not reach it.
        .process_group(0)
        .spawn()
        .with_context(|| format!("failed to start {}", exe.display()))?;
    let started = Started {
        name: name.to_owned(),
        pid: i32::try_from(child.id()).context("pid out of range")?,
        exe: exe.to_owned(),
    };
    record_pid(state, &started)?;
    Ok((started, child))
}

/// Polls `check` until it is true, failing early when `s` exits and at the
/// deadline, either way with the tail of its log. (Exit is seen through the
/// `Child`: right after the fork `/proc/PID/cmdline` is still ours.)
fn wait_for(
    state: &StateDir,
    (s, child): &mut (Started, Child),
    what: &str,
    mut check: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    let log = state.logs().join(format!("{}.log", s.name));
    loop {
        if check() {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            bail!(
                "{} exited ({status}) while waiting for {what}; last lines of {}:\n{}",
                s.name,
                log.display(),
                log_tail(&log, 30)
            );
        }
        if Instant::now() > deadline {
            bail!(
                "timed out after {READY_TIMEOUT:?} waiting for {what}; last lines of {}:\n{}",
                log.display(),
                log_tail(&log, 30)
            );
        }
        sleep(Duration::from_millis(300));
    }
}

fn kubectl_ok(bins: &Binaries, kubeconfig: &Path, args: &[&str]) -> bool {
    Command::new(&bins.kubectl)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("--request-timeout=5s")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Starts the test environment (building the binaries first when `build`);
/// returns the absolute path of its admin kubeconfig, and `false` when it was
/// already up (then the caller did not start it and should not stop it).
pub fn up(build: bool, with_node: bool) -> anyhow::Result<(PathBuf, bool)> {
    up_in(&StateDir::new(None), build, with_node)
}

fn up_in(state: &StateDir, build: bool, with_node: bool) -> anyhow::Result<(PathBuf, bool)> {
    let bins = if build {
        ensure_built()?
    } else {
        let bins = Binaries::cached();
        if !bins.kube_present() || !bins.etcd.is_file() {
            bail!(
                "the control-plane binaries are not cached under {}: run `cargo xtask testenv build` \
                 (or `cargo xtask setup`) first",
                cache_dir().join("bin").display()
            );
        }
        bins
    };
    let _lock = lock(state)?;
    if is_up(state) {
        eprintln!("testenv: already up");
        if with_node && !node::is_up(state) {
            add_node(state, &bins)?;
            return Ok((state.kubeconfig(), true));
        }
        return Ok((state.kubeconfig(), false));
    }
    // Leftovers of a crashed or interrupted run: stop what is ours, clear the rest.
    stop_all(state)?;
    let started = Instant::now();
    let result = start(state, &bins).and_then(|kubeconfig| {
        if with_node {
            node::start(state, &bins, &kubeconfig)?;
        }
        Ok(kubeconfig)
    });
    if result.is_err() {
        let _ = stop_all(state);
    }
    let kubeconfig = result?;
    eprintln!(
        "testenv: up in {:.1?} (kubectl: cargo xtask testenv kubectl -- get pods -A)",
        started.elapsed()
    );
    Ok((kubeconfig, true))
}

/// Adds the node to a running control plane; on failure removes what it started.
fn add_node(state: &StateDir, bins: &Binaries) -> anyhow::Result<()> {
    let result = node::start(state, bins, &state.kubeconfig());
    if result.is_err() {
        for s in read_pids(state).iter().rev() {
            if node::NODE_COMPONENTS.contains(&s.name.as_str()) {
                stop(s);
            }
        }
        let pids: String = read_pids(state)
            .iter()
            .filter(|s| !node::NODE_COMPONENTS.contains(&s.name.as_str()))
            .map(|s| format!("{} {} {}\n", s.name, s.pid, s.exe.display()))
            .collect();
        let _ = fs::write(state.pids(), pids);
        if let Err(e) = node::clean_up(state) {
            eprintln!("testenv: {e:#}");
        }
    }
    result
}

fn start(state: &StateDir, bins: &Binaries) -> anyhow::Result<PathBuf> {
    for d in [state.logs(), state.data()] {
        fs::create_dir_all(&d).with_context(|| format!("mkdir {}", d.display()))?;
    }
    let pki = state.pki();
    generate_pki(&pki)?;
    let token = random_hex(24)?;
    fs::write(
        pki.join("tokens.csv"),
        format!("{token},mbcas-testenv-admin,mbcas-testenv-admin,system:masters\n"),
    )
    .context("write tokens.csv")?;
    let kubeconfig = state.kubeconfig();
    let p = |name: &str| pki.join(name).display().to_string();

    // etcd
    let [client, peer] = free_ports()?;
    let client_url = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let etcd_args: Vec<String> = vec![
        "--name=testenv".into(),
        format!("--data-dir={}", state.data().join("etcd").display()),
        format!("--listen-client-urls={client_url}"),
        format!("--advertise-client-urls={client_url}"),
        format!("--listen-peer-urls={peer_url}"),
        format!("--initial-advertise-peer-urls={peer_url}"),
        format!("--initial-cluster=testenv={peer_url}"),
        "--unsafe-no-fsync=true".into(),
        "--log-level=warn".into(),
    ];
    let mut etcd = spawn(state, "etcd", &bins.etcd, &etcd_args)?;
    wait_for(state, &mut etcd, "etcd to listen", || {
        TcpStream::connect(("127.0.0.1", client)).is_ok()
    })?;

    // kube-apiserver
    let [port] = free_ports()?;
    let apiserver_args: Vec<String> = vec![
        format!("--etcd-servers={client_url}"),
        format!("--secure-port={port}"),
        "--bind-address=127.0.0.1".into(),
        // SO_REUSEPORT: `testenv start kube-apiserver` after `kill` can bind the
        // port again while the killed server's connections linger.
        "--permit-port-sharing=true".into(),
        "--advertise-address=127.0.0.1".into(),
        // Endpoints may not point at loopback: keep no `kubernetes` endpoints
        // rather than log a validation error every 10 s.
        "--endpoint-reconciler-type=none".into(),
        format!("--cert-dir={}", p("apiserver")),
        format!("--tls-cert-file={}", p("server.crt")),
        format!("--tls-private-key-file={}", p("server.key")),
        format!("--client-ca-file={}", p("ca.crt")),
        format!("--token-auth-file={}", p("tokens.csv")),
        "--authorization-mode=RBAC".into(),
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
        format!("--service-account-key-file={}", p("sa.pub")),
        format!("--service-account-signing-key-file={}", p("sa.key")),
        format!("--service-cluster-ip-range={SERVICE_CIDR}"),
        "--allow-privileged=true".into(),
        "--anonymous-auth=false".into(),
        "--profiling=false".into(),
        "--v=1".into(),
    ];
    let mut apiserver = spawn(state, "kube-apiserver", &bins.apiserver, &apiserver_args)?;
    fs::write(
        &kubeconfig,
        kubeconfig_yaml(port, &pki.join("ca.crt"), &token),
    )
    .with_context(|| format!("write {}", kubeconfig.display()))?;
    wait_for(state, &mut apiserver, "kube-apiserver /readyz", || {
        kubectl_ok(bins, &kubeconfig, &["get", "--raw=/readyz"])
    })?;

    // kube-controller-manager: service accounts and their tokens, namespace
    // deletion, ownerReference garbage collection.
    let cm_args: Vec<String> = vec![
        format!("--kubeconfig={}", kubeconfig.display()),
        // daemonset and root-ca-cert-publisher (the `kube-root-ca.crt`
        // ConfigMap that service-account token volumes need) serve the node.
        "--controllers=serviceaccount-token,serviceaccount,garbagecollector,namespace,daemonset,\
         root-ca-cert-publisher"
            .into(),
        format!("--service-account-private-key-file={}", p("sa.key")),
        format!("--root-ca-file={}", p("ca.crt")),
        "--leader-elect=false".into(),
        // No HTTPS endpoint (health, metrics): nothing here needs it.
        "--secure-port=0".into(),
        "--v=1".into(),
    ];
    let mut cm = spawn(
        state,
        "kube-controller-manager",
        &bins.controller_manager,
        &cm_args,
    )?;
    wait_for(state, &mut cm, "the default ServiceAccount", || {
        kubectl_ok(
            bins,
            &kubeconfig,
            &["get", "serviceaccount", "default", "-n", "default"],
        )
    })?;
    Ok(kubeconfig)
}

// ---------------------------------------------------------------------------
// Fault injection: one component at a time

fn component(state: &StateDir, name: &str) -> anyhow::Result<Started> {
    read_pids(state)
        .into_iter()
        .rev()
        .find(|s| s.name == name)
        .with_context(|| {
            format!(
                "no component {name:?} in {} (etcd, kube-apiserver, kube-controller-manager)",
                state.pids().display()
            )
        })
}

fn kill_component(state: &StateDir, name: &str) -> anyhow::Result<()> {
    let _lock = lock(state)?;
    let s = component(state, name)?;
    if !runs(s.pid, &s.exe) {
        bail!("{name} (pid {}) is not running", s.pid);
    }
    kill(Pid::from_raw(s.pid), Signal::SIGKILL)
        .with_context(|| format!("SIGKILL {name} (pid {})", s.pid))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while runs(s.pid, &s.exe) {
        if Instant::now() > deadline {
            bail!("{name} (pid {}) survived SIGKILL for 10 s", s.pid);
        }
        sleep(Duration::from_millis(50));
    }
    eprintln!("testenv: killed {name} (pid {})", s.pid);
    Ok(())
}

fn start_component(state: &StateDir, name: &str) -> anyhow::Result<()> {
    let _lock = lock(state)?;
    let old = component(state, name)?;
    if runs(old.pid, &old.exe) {
        bail!("{name} (pid {}) is already running", old.pid);
    }
    let path = state.args(name);
    let args: Vec<String> = serde_json::from_str(
        &fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?,
    )
    .with_context(|| format!("{}: not a JSON list of flags", path.display()))?;
    // The pids file keeps one line per component: the new process replaces the old.
    let others: String = read_pids(state)
        .iter()
        .filter(|s| s.name != name)
        .map(|s| format!("{} {} {}\n", s.name, s.pid, s.exe.display()))
        .collect();
    fs::write(state.pids(), others).with_context(|| format!("write {}", state.pids().display()))?;
    let mut child = spawn(state, name, &old.exe, &args)?;
    if name == "kube-apiserver" {
        let bins = Binaries::cached();
        let kubeconfig = state.kubeconfig();
        wait_for(state, &mut child, "kube-apiserver /readyz", || {
            kubectl_ok(&bins, &kubeconfig, &["get", "--raw=/readyz"])
        })?;
    } else {
        let started = Instant::now();
        wait_for(
            state,
            &mut child,
            &format!("{name} to stay up for 1 s"),
            || started.elapsed() > Duration::from_secs(1),
        )?;
    }
    eprintln!("testenv: started {name} again (pid {})", child.0.pid);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KUBE_MOD: &str = "module k8s.io/kubernetes\n\ngo 1.25.0\n\ngodebug default=go1.25\n\n\
        require (\n\tk8s.io/api v0.0.0\n)\n\nreplace (\n\tk8s.io/api => ./staging/src/k8s.io/api\n\
        \tk8s.io/kubectl => ./staging/src/k8s.io/kubectl\n\tfoo.io/bar => foo.io/bar v1.0.0\n)\n\
        replace k8s.io/kms => ./staging/src/k8s.io/kms\n";

    #[test]
    fn staging_replaces_become_published_versions() {
        assert_eq!(
            staging_modules(KUBE_MOD),
            ["k8s.io/api", "k8s.io/kubectl", "k8s.io/kms"]
        );
        let wrapper = kubernetes_wrapper_go_mod(KUBE_MOD, "v1.35.4").unwrap_or_default();
        assert!(
            wrapper.contains("go 1.25.0\ngodebug default=go1.25\n"),
            "{wrapper}"
        );
        assert!(
            wrapper.contains("require k8s.io/kubernetes v1.35.4\n"),
            "{wrapper}"
        );
        assert!(
            wrapper.contains("\tk8s.io/kms => k8s.io/kms v0.35.4\n"),
            "{wrapper}"
        );
        assert!(!wrapper.contains("foo.io"), "{wrapper}");
        assert!(staging_version("2.0.0").is_err());
    }

    #[test]
    fn pids_file_round_trips_and_skips_garbage() {
        let text =
            "etcd 12 /c/bin/etcd-v3.6.16\nbad line\nkube-apiserver 13 /c/my bin/kube-apiserver\n";
        let got = parse_pids(text);
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].pid, 13);
        assert_eq!(got[1].exe, PathBuf::from("/c/my bin/kube-apiserver"));
    }

    #[test]
    fn runs_checks_the_command_line() {
        let me = i32::try_from(std::process::id()).unwrap_or_default();
        let exe = fs::read(format!("/proc/{me}/cmdline"))
            .ok()
            .and_then(|c| c.split(|b| *b == 0).next().map(<[u8]>::to_vec))
            .unwrap_or_default();
        let exe = PathBuf::from(String::from_utf8_lossy(&exe).into_owned());
        assert!(runs(me, &exe));
        assert!(!runs(me, Path::new("/nonexistent/etcd")));
    }
}
