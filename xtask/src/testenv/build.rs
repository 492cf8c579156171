//! Building the control-plane and node binaries from their Go modules, and
//! caching them under `~/.cache/mbcas/bin/`.

use std::{
    fs::{self},
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, bail};

use super::*;
use crate::cmd::{output_of, run_cmd};

pub(crate) fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// `$MBCAS_TESTENV_CACHE_DIR`, else `~/.cache/mbcas`.
pub(crate) fn cache_dir() -> PathBuf {
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
        let v = kubernetes_version();
        Self {
            etcd: bin.join(format!("etcd-{ETCD_VERSION}")),
            apiserver: bin.join(format!("kube-apiserver-{v}")),
            controller_manager: bin.join(format!("kube-controller-manager-{v}")),
            kubectl: bin.join(format!("kubectl-{v}")),
            kubelet: bin.join(format!("kubelet-{v}")),
            scheduler: bin.join(format!("kube-scheduler-{v}")),
        }
    }

    /// The Kubernetes binaries a control plane needs (kube-apiserver,
    /// kube-controller-manager, kubectl), in [`KUBE_COMMANDS`]' order, and
    /// with `with_node` the kubelet and the scheduler after them.
    fn kube(&self, with_node: bool) -> Vec<&PathBuf> {
        let all = [
            &self.apiserver,
            &self.controller_manager,
            &self.kubectl,
            &self.kubelet,
            &self.scheduler,
        ];
        all[..kube_commands(with_node).len()].to_vec()
    }

    /// Whether [`Binaries::kube`] are all cached.
    pub(super) fn kube_present(&self, with_node: bool) -> bool {
        self.kube(with_node).iter().all(|p| p.is_file())
    }
}

/// The commands to build: the control plane's, and with `with_node` the node's.
fn kube_commands(with_node: bool) -> &'static [&'static str] {
    if with_node {
        KUBE_COMMANDS
    } else {
        &KUBE_COMMANDS[..CONTROL_PLANE_COMMANDS]
    }
}

/// Builds whatever is not cached yet (the node's binaries too); returns the
/// binaries.
pub fn ensure_built() -> anyhow::Result<Binaries> {
    ensure_built_for(true)
}

/// Builds whatever is not cached yet: the control plane and etcd, and with
/// `with_node` the kubelet, the scheduler and containerd too (the control
/// plane alone builds in about two thirds of the time).
pub fn ensure_built_for(with_node: bool) -> anyhow::Result<Binaries> {
    let bins = Binaries::cached();
    if bins.kube_present(with_node) {
        eprintln!(
            "testenv: Kubernetes {} binaries cached",
            kubernetes_version()
        );
    } else {
        build_kubernetes(&bins, with_node)?;
    }
    if bins.etcd.is_file() {
        eprintln!("testenv: etcd {ETCD_VERSION} cached");
    } else {
        build_etcd(&bins)?;
    }
    if with_node {
        let nbins = node::NodeBinaries::cached();
        if nbins.present() {
            eprintln!("testenv: containerd {} cached", node::CONTAINERD_VERSION);
        } else {
            node::build(&nbins)?;
        }
    }
    Ok(bins)
}

pub(super) fn go_binary() -> anyhow::Result<PathBuf> {
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
pub(super) fn go(dir: &Path) -> anyhow::Result<Command> {
    let mut cmd = Command::new(go_binary()?);
    let cache = cache_dir().join("go");
    cmd.current_dir(dir)
        .env("GOMODCACHE", cache.join("mod"))
        .env("GOCACHE", cache.join("build"))
        .env("GOTOOLCHAIN", "local");
    Ok(cmd)
}

/// Downloads `module@version` and returns the path of its go.mod.
pub(super) fn download_go_mod(dir: &Path, module: &str, version: &str) -> anyhow::Result<PathBuf> {
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
pub(super) fn go_directives(go_mod: &str) -> String {
    go_mod
        .lines()
        .filter(|l| l.starts_with("go ") || l.starts_with("godebug "))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// The modules Kubernetes' go.mod replaces by its own `./staging/` copies.
pub(super) fn staging_modules(go_mod: &str) -> Vec<String> {
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
pub(super) fn staging_version(kubernetes: &str) -> anyhow::Result<String> {
    kubernetes
        .strip_prefix("v1.")
        .map(|rest| format!("v0.{rest}"))
        .with_context(|| format!("unexpected Kubernetes version {kubernetes}"))
}

/// The wrapper module that builds `k8s.io/kubernetes` commands against the
/// published staging modules.
pub(super) fn kubernetes_wrapper_go_mod(upstream: &str, version: &str) -> anyhow::Result<String> {
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

pub(super) fn tools_go(imports: &[String]) -> String {
    let mut out = String::from("//go:build tools\n\npackage tools\n\nimport (\n");
    for i in imports {
        out.push_str(&format!("\t_ \"{i}\"\n"));
    }
    out.push_str(")\n");
    out
}

pub(super) fn install(built: &Path, dest: &Path) -> anyhow::Result<()> {
    if let Some(parent) = dest.parent() {
        fs::create_dir_all(parent).with_context(|| format!("mkdir {}", parent.display()))?;
    }
    fs::rename(built, dest)
        .with_context(|| format!("move {} to {}", built.display(), dest.display()))
}

pub(super) fn build_kubernetes(bins: &Binaries, with_node: bool) -> anyhow::Result<()> {
    let started = Instant::now();
    let version = kubernetes_version();
    let dir = cache_dir().join(format!("build/kubernetes-{version}"));
    fs::create_dir_all(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
    let commands = kube_commands(with_node);
    eprintln!(
        "testenv: building {} {version} in {} (first time only; about 10-15 minutes on 2 cores)",
        commands.join(", "),
        dir.display()
    );
    let go_mod_path = download_go_mod(&dir, "k8s.io/kubernetes", &version)?;
    let upstream = fs::read_to_string(&go_mod_path)
        .with_context(|| format!("read {}", go_mod_path.display()))?;
    let wrapper = kubernetes_wrapper_go_mod(&upstream, &version)?;
    fs::write(dir.join("go.mod"), wrapper).context("write wrapper go.mod")?;
    let imports: Vec<String> = commands
        .iter()
        .map(|c| format!("k8s.io/kubernetes/cmd/{c}"))
        .collect();
    fs::write(dir.join("tools.go"), tools_go(&imports)).context("write tools.go")?;
    run_cmd(go(&dir)?.args(["mod", "tidy"]))?;
    let staging_version = staging_version(&version)?;
    let minor = version.split('.').nth(1).unwrap_or("0");
    let ldflags = format!(
        "-X k8s.io/component-base/version.gitVersion={version} \
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
    for (c, dest) in commands.iter().zip(bins.kube(with_node)) {
        install(&out.join(c), dest)?;
    }
    eprintln!(
        "testenv: Kubernetes {version} built in {:.0?}",
        started.elapsed()
    );
    Ok(())
}

pub(super) fn build_etcd(bins: &Binaries) -> anyhow::Result<()> {
    const MODULE: &str = "go.etcd.io/etcd/server/v3";
    build_go_tool("etcd", MODULE, ETCD_VERSION, MODULE, "", &bins.etcd)
}

/// Builds the command `package` of `module@version` through a wrapper module
/// under the cache's `build/<name>-<version>` (its go.mod requires the module
/// and repeats its `go`/`godebug` lines) and installs it as `dest`.
pub(crate) fn build_go_tool(
    name: &str,
    module: &str,
    version: &str,
    package: &str,
    ldflags: &str,
    dest: &Path,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let dir = cache_dir().join(format!("build/{name}-{version}"));
    fs::create_dir_all(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
    eprintln!(
        "testenv: building {name} {version} in {} (first time only)",
        dir.display()
    );
    let go_mod_path = download_go_mod(&dir, module, version)?;
    let upstream = fs::read_to_string(&go_mod_path)
        .with_context(|| format!("read {}", go_mod_path.display()))?;
    fs::write(
        dir.join("go.mod"),
        format!(
            "module mbcas.io/testenv/{name}\n\n{}\nrequire {module} {version}\n",
            go_directives(&upstream)
        ),
    )
    .context("write wrapper go.mod")?;
    fs::write(dir.join("tools.go"), tools_go(&[package.to_owned()])).context("write tools.go")?;
    run_cmd(go(&dir)?.args(["mod", "tidy"]))?;
    let out = dir.join("out").join(name);
    run_cmd(
        go(&dir)?
            .args(["build", "-ldflags", ldflags, "-o"])
            .arg(&out)
            .arg(package),
    )?;
    install(&out, dest)?;
    eprintln!(
        "testenv: {name} {version} built in {:.0?}",
        started.elapsed()
    );
    Ok(())
}
