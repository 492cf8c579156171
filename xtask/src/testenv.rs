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
    fs,
    net::TcpStream,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

pub mod node;

/// The Kubernetes release the test environment builds and runs by default
/// (kube-apiserver, kube-controller-manager, kubectl, kubelet, kube-scheduler).
pub const KUBERNETES_VERSION: &str = "v1.37.2";
/// The oldest release still proven (in-place resize GA): CI runs the
/// control-plane tier on it too.
pub const KUBERNETES_OLDEST: &str = "v1.35.4";
/// Picks another release for every command: `MBCAS_TESTENV_KUBERNETES=v1.35.4`
/// (`testenv --kubernetes` for the testenv commands alone).
pub const KUBERNETES_VERSION_ENV: &str = "MBCAS_TESTENV_KUBERNETES";

static KUBERNETES_OVERRIDE: std::sync::RwLock<Option<String>> = std::sync::RwLock::new(None);

/// Makes every later build and start in this process use `version` (`None`:
/// back to `$MBCAS_TESTENV_KUBERNETES` or the default).
pub fn set_kubernetes_version(version: Option<&str>) {
    if let Ok(mut v) = KUBERNETES_OVERRIDE.write() {
        *v = version.map(str::to_owned);
    }
}

/// The Kubernetes release this command builds and runs: `testenv --kubernetes`,
/// else `$MBCAS_TESTENV_KUBERNETES`, else [`KUBERNETES_VERSION`]. An invalid
/// one was refused at start-up ([`check_kubernetes_version`]).
pub fn kubernetes_version() -> String {
    KUBERNETES_OVERRIDE
        .read()
        .ok()
        .and_then(|v| v.clone())
        .or_else(|| std::env::var(KUBERNETES_VERSION_ENV).ok())
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| KUBERNETES_VERSION.to_owned())
}

/// `v1.MINOR.PATCH`, as the Go module proxy names `k8s.io/kubernetes`.
fn valid_kubernetes_version(v: &str) -> bool {
    v.strip_prefix("v1.").is_some_and(|rest| {
        let parts: Vec<&str> = rest.split('.').collect();
        parts.len() == 2
            && parts
                .iter()
                .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
    })
}

/// Refuses a malformed `$MBCAS_TESTENV_KUBERNETES` before anything is built.
pub fn check_kubernetes_version() -> anyhow::Result<()> {
    match std::env::var(KUBERNETES_VERSION_ENV) {
        Ok(v) if !v.is_empty() && !valid_kubernetes_version(&v) => bail!(
            "{KUBERNETES_VERSION_ENV}={v}: not a Kubernetes release (v1.MINOR.PATCH, e.g. \
             {KUBERNETES_VERSION} or {KUBERNETES_OLDEST})"
        ),
        _ => Ok(()),
    }
}
/// The etcd release (server module `go.etcd.io/etcd/server/v3`).
pub const ETCD_VERSION: &str = "v3.6.16";
/// The environment variable through which tests receive the kubeconfig.
pub const KUBECONFIG_ENV: &str = "MBCAS_TESTENV_KUBECONFIG";

const SERVICE_CIDR: &str = "10.0.0.0/24";
/// The Kubernetes commands built, the control plane's first.
const KUBE_COMMANDS: &[&str] = &[
    "kube-apiserver",
    "kube-controller-manager",
    "kubectl",
    "kubelet",
    "kube-scheduler",
];
/// How many of [`KUBE_COMMANDS`] a control plane without a node needs.
const CONTROL_PLANE_COMMANDS: usize = 3;
const READY_TIMEOUT: Duration = Duration::from_secs(180);

#[derive(Debug, clap::Args)]
pub struct Options {
    /// Where this environment keeps its state (default `target/testenv`): a
    /// second directory gives a second, independent control plane.
    #[arg(long, global = true, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// The Kubernetes release to build and run (v1.MINOR.PATCH; default the
    /// newest tested, also `$MBCAS_TESTENV_KUBERNETES`). Each is cached apart.
    #[arg(long, global = true, value_name = "VERSION", value_parser = parse_kubernetes_version)]
    pub kubernetes: Option<String>,
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

fn parse_kubernetes_version(v: &str) -> Result<String, String> {
    if valid_kubernetes_version(v) {
        Ok(v.to_owned())
    } else {
        Err(format!(
            "not a Kubernetes release (v1.MINOR.PATCH, e.g. {KUBERNETES_VERSION} or {KUBERNETES_OLDEST})"
        ))
    }
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    if let Some(v) = &opts.kubernetes {
        set_kubernetes_version(Some(v));
    }
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

mod build;
mod faults;
mod pki;
mod process;

pub use self::build::{Binaries, ensure_built, ensure_built_for};
pub(crate) use self::build::{build_go_tool, cache_dir, workspace_root};
use self::{build::*, faults::*, pki::*, process::*};

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

/// Starts the test environment (building the binaries first when `build`);
/// returns the absolute path of its admin kubeconfig, and `false` when it was
/// already up (then the caller did not start it and should not stop it).
pub fn up(build: bool, with_node: bool) -> anyhow::Result<(PathBuf, bool)> {
    up_in(&StateDir::new(None), build, with_node)
}

fn up_in(state: &StateDir, build: bool, with_node: bool) -> anyhow::Result<(PathBuf, bool)> {
    let bins = if build {
        ensure_built_for(with_node)?
    } else {
        let bins = Binaries::cached();
        if !bins.kube_present(with_node) || !bins.etcd.is_file() {
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
        // ConfigMap that service-account token volumes need) serve the node;
        // job runs the Helm chart's uninstall hook.
        "--controllers=serviceaccount-token,serviceaccount,garbagecollector,namespace,daemonset,\
         job,root-ca-cert-publisher"
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    const KUBE_MOD: &str = "module k8s.io/kubernetes\n\ngo 1.25.0\n\ngodebug default=go1.25\n\n\
        require (\n\tk8s.io/api v0.0.0\n)\n\nreplace (\n\tk8s.io/api => ./staging/src/k8s.io/api\n\
        \tk8s.io/kubectl => ./staging/src/k8s.io/kubectl\n\tfoo.io/bar => foo.io/bar v1.0.0\n)\n\
        replace k8s.io/kms => ./staging/src/k8s.io/kms\n";

    #[test]
    fn kubernetes_versions_are_checked() {
        for ok in ["v1.35.4", "v1.37.2", "v1.40.10"] {
            assert!(valid_kubernetes_version(ok), "{ok}");
        }
        for bad in [
            "1.35.4",
            "v1.35",
            "v1.35.4-rc.1",
            "v2.0.0",
            "v1..4",
            "latest",
            "",
        ] {
            assert!(!valid_kubernetes_version(bad), "{bad}");
        }
        assert!(parse_kubernetes_version("v1.35").is_err());
    }

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
