//! `cargo xtask testenv up --with-node`: a real node joined to the control
//! plane — containerd and the kubelet built from their Go modules, runc and
//! the CNI plugins from Debian, images built offline — so pods really run, in
//! real cgroups, and in-place resizes are really actuated.
//!
//! What the node owns, all of it removed by `down` (also after a failed run):
//! * processes: containerd, kubelet, kube-scheduler (recorded like the control
//!   plane's); the runc shims it launched (found by their executable, ours);
//!   the containers (found in the node's own cgroups, `/mbcas-node`);
//! * `target/testenv/node/`: containerd's root and state, the kubelet's root
//!   directory, pod logs, CNI configuration and IPAM state, images, configs;
//!   every mount below it (rootfs overlays, `/dev/shm`, volumes, netns);
//! * the cgroup `/mbcas-node` in every hierarchy (the kubelet's `cgroupRoot`);
//! * the bridge `mbcas0`, the CNI result files of our pods (networks
//!   `mbcas-testenv` and `cni-loopback`, those not there before `up`),
//!   `/var/log/containers` links into our pod logs;
//! * the sysctls the kubelet and the bridge plugin change
//!   (`vm.overcommit_memory`, `kernel.panic`, `kernel.panic_on_oops`,
//!   `net.ipv4.ip_forward`): recorded on `up`, put back on `down`;
//! * `/run/containerd`, `/var/lib/cni`, `/var/log/containers` and
//!   `/var/lib/kubelet` (paths compiled into containerd, libcni and the
//!   kubelet) when they did not exist before `up`.

use std::{
    fs,
    net::TcpStream,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use super::{
    Binaries, StateDir, cache_dir, download_go_mod, free_ports, go, go_directives, install,
    kubectl_ok, read_pids, runs, spawn, tools_go, wait_for, workspace_root,
};
use crate::cmd::{output_of, run_cmd};

/// The containerd release built for the node (`github.com/containerd/containerd/v2`).
pub const CONTAINERD_VERSION: &str = "v2.2.9";
/// The node's name and the label that selects it.
pub const NODE_NAME: &str = "mbcas-testenv-node";
pub const NODE_LABEL: &str = "mbcas.io/testenv-node";
/// The kubelet's `cgroupRoot`: every pod cgroup of the node is below it.
pub const CGROUP_ROOT: &str = "mbcas-node";
/// The image every pod of the node runs: the `mbcas` binary this checkout
/// builds (the daemon, and `mbcas burn` as the workload).
pub const MBCAS_IMAGE: &str = "docker.io/library/mbcas:dev";
const PAUSE_IMAGE: &str = "localhost/mbcas-testenv/pause:1";
const BRIDGE: &str = "mbcas0";
const NETWORK: &str = "mbcas-testenv";
const POD_SUBNET: &str = "10.89.0.0/24";
const RUNC: &str = "/usr/sbin/runc";
const CNI_BIN: &str = "/usr/lib/cni";
/// Changed by the kubelet (the first three) and by the CNI bridge plugin as
/// the pods' gateway (`ip_forward`).
const SYSCTLS: &[&str] = &[
    "vm/overcommit_memory",
    "kernel/panic",
    "kernel/panic_on_oops",
    "net/ipv4/ip_forward",
];
const CONTAINERD_COMMANDS: &[&str] = &["containerd", "ctr", "containerd-shim-runc-v2"];
const NODE_READY_TIMEOUT: Duration = Duration::from_secs(180);

/// The node's cached binaries (containerd's, and the pause program).
#[derive(Debug, Clone)]
pub struct NodeBinaries {
    pub containerd: PathBuf,
    pub ctr: PathBuf,
    pub shim: PathBuf,
    pub pause: PathBuf,
}

impl NodeBinaries {
    pub fn cached() -> Self {
        let dir = cache_dir().join(format!("bin/containerd-{CONTAINERD_VERSION}"));
        Self {
            containerd: dir.join("containerd"),
            ctr: dir.join("ctr"),
            shim: dir.join("containerd-shim-runc-v2"),
            pause: dir.join("pause"),
        }
    }

    pub fn present(&self) -> bool {
        [&self.containerd, &self.ctr, &self.shim, &self.pause]
            .iter()
            .all(|p| p.is_file())
    }
}

/// The pause container: sleeps until told to stop (the pod's network and IPC
/// namespaces live as long as it does).
const PAUSE_GO: &str = "package main\n\nimport (\n\t\"os\"\n\t\"os/signal\"\n\t\"syscall\"\n)\n\n\
func main() {\n\tc := make(chan os.Signal, 1)\n\tsignal.Notify(c, syscall.SIGINT, syscall.SIGTERM)\n\t<-c\n}\n";

/// Builds containerd, ctr, the runc shim and the pause program (static, no
/// cgo) into the cache.
pub fn build(bins: &NodeBinaries) -> anyhow::Result<()> {
    const MODULE: &str = "github.com/containerd/containerd/v2";
    let started = Instant::now();
    let dir = cache_dir().join(format!("build/containerd-{CONTAINERD_VERSION}"));
    fs::create_dir_all(dir.join("pause")).with_context(|| format!("mkdir {}", dir.display()))?;
    eprintln!(
        "testenv: building containerd {CONTAINERD_VERSION} (containerd, ctr, containerd-shim-runc-v2) \
         and the pause program in {} (first time only; a few minutes)",
        dir.display()
    );
    let go_mod_path = download_go_mod(&dir, MODULE, CONTAINERD_VERSION)?;
    let upstream = fs::read_to_string(&go_mod_path)
        .with_context(|| format!("read {}", go_mod_path.display()))?;
    fs::write(
        dir.join("go.mod"),
        format!(
            "module mbcas.io/testenv/containerd\n\n{}\nrequire {MODULE} {CONTAINERD_VERSION}\n",
            go_directives(&upstream)
        ),
    )
    .context("write wrapper go.mod")?;
    let imports: Vec<String> = CONTAINERD_COMMANDS
        .iter()
        .map(|c| format!("{MODULE}/cmd/{c}"))
        .collect();
    fs::write(dir.join("tools.go"), tools_go(&imports)).context("write tools.go")?;
    fs::write(dir.join("pause/main.go"), PAUSE_GO).context("write pause/main.go")?;
    run_cmd(go(&dir)?.args(["mod", "tidy"]))?;
    let out = dir.join("out");
    let ldflags = format!("-X {MODULE}/version.Version={CONTAINERD_VERSION}");
    run_cmd(
        go(&dir)?
            .env("CGO_ENABLED", "0")
            .args([
                "build",
                "-tags",
                "no_btrfs no_devmapper no_zfs urfave_cli_no_docs",
                "-ldflags",
                &ldflags,
                "-o",
            ])
            .arg(format!("{}/", out.display()))
            .args(&imports)
            .arg("./pause"),
    )?;
    install(&out.join("containerd"), &bins.containerd)?;
    install(&out.join("ctr"), &bins.ctr)?;
    install(&out.join("containerd-shim-runc-v2"), &bins.shim)?;
    install(&out.join("pause"), &bins.pause)?;
    eprintln!(
        "testenv: containerd {CONTAINERD_VERSION} built in {:.0?}",
        started.elapsed()
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// Where the node keeps its state

/// `target/testenv/node/` and what lives in it.
pub(super) struct NodeDir {
    root: PathBuf,
}

impl NodeDir {
    pub(super) fn new(state: &StateDir) -> Self {
        Self {
            root: state.root.join("node"),
        }
    }
    fn socket(&self) -> PathBuf {
        self.root.join("run/containerd.sock")
    }
    fn sysctls(&self) -> PathBuf {
        self.root.join("sysctls")
    }
    /// Which of [`HOST_DIRS`] did not exist before `up`.
    fn host_dirs_created(&self) -> PathBuf {
        self.root.join("created-host-dirs")
    }
    fn cni_results_before(&self) -> PathBuf {
        self.root.join("cni-results-before")
    }
    fn pod_logs(&self) -> PathBuf {
        self.root.join("pod-logs")
    }
    pub(super) fn exists(&self) -> bool {
        self.root.exists()
    }
}

/// The node's processes in start order (also the names in the `pids` file).
pub const NODE_COMPONENTS: &[&str] = &["containerd", "kubelet", "kube-scheduler"];

/// Whether the node's processes run.
pub(super) fn is_up(state: &StateDir) -> bool {
    let pids = read_pids(state);
    NODE_COMPONENTS.iter().all(|name| {
        pids.iter()
            .rev()
            .find(|s| s.name == *name)
            .is_some_and(|s| runs(s.pid, &s.exe))
    })
}

// ---------------------------------------------------------------------------
// Configuration files (pure: tested below)

fn containerd_toml(node: &Path, shim: &Path) -> String {
    let n = node.display();
    format!(
        r#"version = 3
root = "{n}/containerd/root"
state = "{n}/containerd/state"

[grpc]
  address = "{n}/run/containerd.sock"

[ttrpc]
  address = "{n}/run/containerd.sock.ttrpc"

[plugins]
  [plugins.'io.containerd.internal.v1.opt']
    path = "{n}/opt"
  [plugins.'io.containerd.nri.v1.nri']
    disable = true
  [plugins.'io.containerd.cri.v1.images']
    snapshotter = "overlayfs"
    [plugins.'io.containerd.cri.v1.images'.pinned_images]
      sandbox = "{PAUSE_IMAGE}"
    [plugins.'io.containerd.cri.v1.images'.registry]
      config_path = "{n}/certs.d"
  [plugins.'io.containerd.cri.v1.runtime']
    # This sandbox's root lacks CAP_SYS_RESOURCE: no negative oom_score_adj.
    restrict_oom_score_adj = true
    enable_cdi = false
    netns_mounts_under_state_dir = true
    [plugins.'io.containerd.cri.v1.runtime'.containerd]
      default_runtime_name = "runc"
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        runtime_path = "{shim}"
        [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
          BinaryName = "{RUNC}"
          Root = "{n}/runc"
          SystemdCgroup = false
    [plugins.'io.containerd.cri.v1.runtime'.cni]
      bin_dirs = ["{CNI_BIN}"]
      conf_dir = "{n}/cni/net.d"
  [plugins.'io.containerd.grpc.v1.cri']
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"
"#,
        shim = shim.display()
    )
}

fn cni_conflist(node: &Path) -> String {
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": NETWORK,
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": true,
                "ipMasq": false,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "dataDir": node.join("cni/ipam").display().to_string(),
                    "ranges": [[{"subnet": POD_SUBNET}]],
                    "routes": [{"dst": "0.0.0.0/0"}]
                }
            },
            {"type": "loopback"}
        ]
    })
    .to_string()
}

fn kubelet_yaml(node: &Path, port: u16, healthz: u16) -> String {
    let n = node.display();
    format!(
        r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# Kubernetes 1.35 refuses cgroup v1 unless told; this machine is v1 (hybrid).
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: /{CGROUP_ROOT}
containerRuntimeEndpoint: unix://{n}/run/containerd.sock
address: 127.0.0.1
port: {port}
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: {healthz}
authentication:
  anonymous:
    enabled: true
  webhook:
    enabled: false
authorization:
  mode: AlwaysAllow
podLogsDir: {n}/pod-logs
volumePluginDir: {n}/volume-plugins
staticPodPath: ""
failSwapOn: false
protectKernelDefaults: false
makeIPTablesUtilChains: false
# The kubelet's own oom_score_adj: a negative one needs CAP_SYS_RESOURCE.
oomScoreAdj: 0
evictionHard:
  memory.available: "1Mi"
  nodefs.available: "1%"
  nodefs.inodesFree: "1%"
  imagefs.available: "1%"
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
enableControllerAttachDetach: false
maxPods: 110
"#
    )
}

// ---------------------------------------------------------------------------
// Offline OCI images

fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let out = output_of(Command::new("sha256sum").arg(path))
        .with_context(|| format!("sha256sum {}", path.display()))?;
    out.split_whitespace()
        .next()
        .map(str::to_owned)
        .with_context(|| format!("sha256sum {}: no digest", path.display()))
}

/// Writes `bytes` as a blob of the OCI layout at `layout`; returns its descriptor.
fn blob(layout: &Path, media_type: &str, bytes: &[u8]) -> anyhow::Result<serde_json::Value> {
    let tmp = layout.join("blob.tmp");
    fs::write(&tmp, bytes).with_context(|| format!("write {}", tmp.display()))?;
    let digest = sha256_file(&tmp)?;
    let dest = layout.join("blobs/sha256").join(&digest);
    fs::rename(&tmp, &dest).with_context(|| format!("move to {}", dest.display()))?;
    Ok(serde_json::json!({
        "mediaType": media_type,
        "digest": format!("sha256:{digest}"),
        "size": bytes.len(),
    }))
}

/// An OCI archive of one image: one uncompressed layer holding `files`
/// (source on this machine → absolute path in the image), `entrypoint`, named
/// `name` for `ctr images import`.
fn oci_archive(
    work: &Path,
    name: &str,
    files: &[(PathBuf, PathBuf)],
    entrypoint: &[&str],
) -> anyhow::Result<PathBuf> {
    let slug: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let dir = work.join(&slug);
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("remove {}", dir.display()))?;
    }
    let rootfs = dir.join("rootfs");
    let layout = dir.join("layout");
    fs::create_dir_all(layout.join("blobs/sha256"))
        .with_context(|| format!("mkdir {}", layout.display()))?;
    for d in ["tmp", "etc", "proc", "sys", "dev"] {
        fs::create_dir_all(rootfs.join(d)).with_context(|| format!("mkdir {d} in rootfs"))?;
    }
    fs::set_permissions(rootfs.join("tmp"), fs::Permissions::from_mode(0o1777))
        .context("chmod rootfs/tmp")?;
    for (src, dest) in files {
        let rel = dest.strip_prefix("/").unwrap_or(dest);
        let to = rootfs.join(rel);
        if let Some(parent) = to.parent() {
            fs::create_dir_all(parent).with_context(|| format!("mkdir {}", parent.display()))?;
        }
        fs::copy(src, &to).with_context(|| format!("copy {} into the image", src.display()))?;
    }
    let layer_tar = dir.join("layer.tar");
    run_cmd(
        Command::new("tar")
            .args([
                "--sort=name",
                "--owner=0",
                "--group=0",
                "--numeric-owner",
                "--mtime=@0",
                "-cf",
            ])
            .arg(&layer_tar)
            .arg("-C")
            .arg(&rootfs)
            .arg("."),
    )?;
    let layer_bytes =
        fs::read(&layer_tar).with_context(|| format!("read {}", layer_tar.display()))?;
    let layer = blob(
        &layout,
        "application/vnd.oci.image.layer.v1.tar",
        &layer_bytes,
    )?;
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Entrypoint": entrypoint,
            "Env": ["PATH=/usr/local/bin:/usr/bin:/bin"],
        },
        "rootfs": {"type": "layers", "diff_ids": [layer["digest"]]},
    });
    let config = blob(
        &layout,
        "application/vnd.oci.image.config.v1+json",
        config.to_string().as_bytes(),
    )?;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config,
        "layers": [layer],
    });
    let mut manifest = blob(
        &layout,
        "application/vnd.oci.image.manifest.v1+json",
        manifest.to_string().as_bytes(),
    )?;
    manifest["annotations"] = serde_json::json!({ "io.containerd.image.name": name });
    manifest["platform"] = serde_json::json!({"architecture": "amd64", "os": "linux"});
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [manifest],
    });
    fs::write(layout.join("index.json"), index.to_string()).context("write index.json")?;
    fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .context("write oci-layout")?;
    let archive = dir.join("image.tar");
    run_cmd(
        Command::new("tar")
            .arg("-cf")
            .arg(&archive)
            .arg("-C")
            .arg(&layout)
            .args(["oci-layout", "index.json", "blobs"]),
    )?;
    Ok(archive)
}

fn build_images(node: &NodeDir, nbins: &NodeBinaries) -> anyhow::Result<Vec<PathBuf>> {
    let work = node.root.join("images");
    let pause = oci_archive(
        &work,
        PAUSE_IMAGE,
        &[(nbins.pause.clone(), PathBuf::from("/pause"))],
        &["/pause"],
    )?;
    let exe = crate::e2e::build_mbcas()?;
    let mut files = vec![(exe.clone(), PathBuf::from("/usr/local/bin/mbcas"))];
    for lib in crate::cmd::shared_libraries(&exe)? {
        // The path as the loader looks it up, and where the file really is.
        let real = fs::canonicalize(&lib).unwrap_or_else(|_| lib.clone());
        files.push((real, lib));
    }
    let mbcas = oci_archive(&work, MBCAS_IMAGE, &files, &["/usr/local/bin/mbcas"])?;
    Ok(vec![pause, mbcas])
}

// ---------------------------------------------------------------------------
// Host changes: recorded on up, undone on down

fn cgroup_hierarchies() -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir("/sys/fs/cgroup") else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .filter(|p| p.join("cgroup.procs").is_file())
        .collect();
    if Path::new("/sys/fs/cgroup/cgroup.procs").is_file() {
        // cgroup v2 mounted at /sys/fs/cgroup itself.
        v = vec![PathBuf::from("/sys/fs/cgroup")];
    }
    v.sort();
    v
}

/// Creates `/mbcas-node` in every hierarchy (the kubelet checks that its
/// cgroup root exists); cpuset needs its cpus and mems before use.
fn create_cgroup_root() -> anyhow::Result<()> {
    for h in cgroup_hierarchies() {
        let dir = h.join(CGROUP_ROOT);
        fs::create_dir_all(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
        for f in ["cpuset.cpus", "cpuset.mems"] {
            if dir.join(f).is_file() {
                let parent = fs::read_to_string(h.join(f)).unwrap_or_default();
                let mine = fs::read_to_string(dir.join(f)).unwrap_or_default();
                if mine.trim().is_empty() && !parent.trim().is_empty() {
                    fs::write(dir.join(f), parent.trim())
                        .with_context(|| format!("write {}", dir.join(f).display()))?;
                }
            }
        }
    }
    Ok(())
}

/// Every process in the node's cgroups: the containers (we started them all,
/// through the kubelet).
fn node_processes() -> Vec<i32> {
    let mut pids = Vec::new();
    for h in cgroup_hierarchies() {
        let mut stack = vec![h.join(CGROUP_ROOT)];
        while let Some(dir) = stack.pop() {
            if let Ok(t) = fs::read_to_string(dir.join("cgroup.procs")) {
                pids.extend(t.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
            }
            if let Ok(entries) = fs::read_dir(&dir) {
                stack.extend(
                    entries
                        .flatten()
                        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                        .map(|e| e.path()),
                );
            }
        }
    }
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// Removes `/mbcas-node` bottom-up in every hierarchy.
fn remove_cgroup_root() -> Vec<String> {
    let mut errors = Vec::new();
    for h in cgroup_hierarchies() {
        let root = h.join(CGROUP_ROOT);
        if !root.exists() {
            continue;
        }
        let mut dirs = Vec::new();
        let mut stack = vec![root];
        while let Some(dir) = stack.pop() {
            if let Ok(entries) = fs::read_dir(&dir) {
                stack.extend(
                    entries
                        .flatten()
                        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                        .map(|e| e.path()),
                );
            }
            dirs.push(dir);
        }
        // Children come after their parent in `dirs`: remove from the end.
        for d in dirs.iter().rev() {
            if let Err(e) = fs::remove_dir(d) {
                errors.push(format!("rmdir {}: {e}", d.display()));
            }
        }
    }
    errors
}

fn record_sysctls(node: &NodeDir) -> anyhow::Result<()> {
    if node.sysctls().is_file() {
        // Recorded by an earlier `up` whose `down` did not finish: keep the originals.
        return Ok(());
    }
    let mut text = String::new();
    for s in SYSCTLS {
        let v = fs::read_to_string(Path::new("/proc/sys").join(s))
            .with_context(|| format!("read /proc/sys/{s}"))?;
        text.push_str(&format!("{s} {}\n", v.trim()));
    }
    fs::write(node.sysctls(), text).with_context(|| format!("write {}", node.sysctls().display()))
}

fn restore_sysctls(node: &NodeDir) -> Vec<String> {
    let mut errors = Vec::new();
    let Ok(text) = fs::read_to_string(node.sysctls()) else {
        return errors;
    };
    for line in text.lines() {
        if let Some((key, value)) = line.split_once(' ')
            && SYSCTLS.contains(&key)
            && let Err(e) = fs::write(Path::new("/proc/sys").join(key), value)
        {
            errors.push(format!("restore /proc/sys/{key} = {value}: {e}"));
        }
    }
    errors
}

const CNI_RESULTS: &str = "/var/lib/cni/results";
/// Paths compiled into containerd (shim sockets), libcni (its cache), the
/// kubelet (container log links, device-plugin sockets), and the MBCAS
/// DaemonSet's state directory (a hostPath): removed on `down` when `up`
/// found them missing.
const HOST_DIRS: &[&str] = &[
    "/run/containerd",
    "/var/lib/cni",
    "/var/log/containers",
    "/var/lib/kubelet",
    "/var/lib/mbcas",
];

fn cni_results() -> Vec<String> {
    fs::read_dir(CNI_RESULTS)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// Mount points at or below `root`, deepest first.
fn mounts_below(root: &Path) -> Vec<PathBuf> {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut v: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        // mountinfo escapes blanks as \040 and so on; our paths have none.
        .map(PathBuf::from)
        .filter(|p| p.starts_with(root))
        .collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    v.dedup();
    v
}

// ---------------------------------------------------------------------------
// Up

fn check_prerequisites() -> anyhow::Result<()> {
    let mut missing = Vec::new();
    for (path, what) in [
        (RUNC, "runc (apt-get install runc)"),
        (
            "/usr/lib/cni/bridge",
            "the CNI plugins (apt-get install containernetworking-plugins)",
        ),
    ] {
        if !Path::new(path).is_file() {
            missing.push(format!("{path}: {what}"));
        }
    }
    if !missing.is_empty() {
        bail!(
            "the test node needs, and this machine lacks: {}; `cargo xtask setup` installs them",
            missing.join("; ")
        );
    }
    if !node_processes().is_empty() {
        bail!(
            "processes already run in the cgroup /{CGROUP_ROOT}: another test node is up \
             (another state directory?); run its `down` first"
        );
    }
    Ok(())
}

fn write_file(path: &Path, text: &str) -> anyhow::Result<()> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).with_context(|| format!("mkdir {}", parent.display()))?;
    }
    fs::write(path, text).with_context(|| format!("write {}", path.display()))
}

/// The node's InternalIP: the kubelet refuses loopback, so the machine's first
/// global IPv4 address (not our bridge's). The kubelet's API and the API
/// server stay on 127.0.0.1.
fn node_ip() -> anyhow::Result<String> {
    let out = output_of(Command::new("ip").args(["-4", "-o", "addr", "show", "scope", "global"]))
        .context("ip -4 addr show failed")?;
    parse_node_ip(&out).context(
        "the machine has no global IPv4 address for the node's InternalIP (the kubelet refuses loopback)",
    )
}

fn parse_node_ip(ip_addr: &str) -> Option<String> {
    ip_addr.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        let dev = it.nth(1)?;
        if dev == BRIDGE {
            return None;
        }
        let cidr = it.skip_while(|w| *w != "inet").nth(1)?;
        cidr.split('/').next().map(str::to_owned)
    })
}

fn node_ready(kubectl: &Path, kubeconfig: &Path) -> bool {
    output_of(
        Command::new(kubectl)
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .arg("--request-timeout=5s")
            .args([
                "get",
                "node",
                NODE_NAME,
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
            ]),
    )
    .is_some_and(|s| s.trim() == "True")
}

/// Starts containerd, the kubelet and kube-scheduler against the running
/// control plane; returns when the Node is Ready.
pub(super) fn start(state: &StateDir, bins: &Binaries, kubeconfig: &Path) -> anyhow::Result<()> {
    check_prerequisites()?;
    let nbins = NodeBinaries::cached();
    if !nbins.present() {
        build(&nbins)?;
    }
    let node = NodeDir::new(state);
    fs::create_dir_all(node.root.join("run"))
        .with_context(|| format!("mkdir {}", node.root.display()))?;
    record_sysctls(&node)?;
    if !node.host_dirs_created().exists() {
        let missing: Vec<&str> = HOST_DIRS
            .iter()
            .copied()
            .filter(|d| !Path::new(d).exists())
            .collect();
        write_file(&node.host_dirs_created(), &missing.join("\n"))?;
    }
    if !node.cni_results_before().exists() {
        write_file(&node.cni_results_before(), &cni_results().join("\n"))?;
    }
    create_cgroup_root()?;
    fs::create_dir_all(node.root.join("certs.d")).context("mkdir certs.d")?;
    write_file(
        &node.root.join("containerd.toml"),
        &containerd_toml(&node.root, &nbins.shim),
    )?;
    write_file(
        &node.root.join("cni/net.d/10-mbcas-testenv.conflist"),
        &cni_conflist(&node.root),
    )?;

    // containerd
    let args = vec![
        "--config".to_owned(),
        node.root.join("containerd.toml").display().to_string(),
        "--log-level=warn".to_owned(),
    ];
    let mut containerd = spawn(state, "containerd", &nbins.containerd, &args)?;
    let ctr = |sub: &[&str]| {
        let mut c = Command::new(&nbins.ctr);
        c.arg("--address")
            .arg(node.socket())
            .args(["-n", "k8s.io"])
            .args(sub);
        c
    };
    wait_for(state, &mut containerd, "containerd to answer", || {
        output_of(&mut ctr(&["version"])).is_some()
    })?;
    for archive in build_images(&node, &nbins)? {
        run_cmd(ctr(&["images", "import", "--snapshotter", "overlayfs"]).arg(&archive))?;
    }

    // kubelet
    let [port, healthz] = free_ports()?;
    write_file(
        &node.root.join("kubelet.yaml"),
        &kubelet_yaml(&node.root, port, healthz),
    )?;
    let args = vec![
        format!("--config={}", node.root.join("kubelet.yaml").display()),
        format!("--kubeconfig={}", kubeconfig.display()),
        format!("--root-dir={}", node.root.join("kubelet").display()),
        format!("--cert-dir={}", node.root.join("kubelet/pki").display()),
        format!("--hostname-override={NODE_NAME}"),
        format!("--node-ip={}", node_ip()?),
        format!("--node-labels={NODE_LABEL}=true"),
        "--v=1".to_owned(),
    ];
    let mut kubelet = spawn(state, "kubelet", &bins.kubelet, &args)?;
    let deadline = Instant::now() + NODE_READY_TIMEOUT;
    wait_for(state, &mut kubelet, "the Node to be Ready", || {
        Instant::now() > deadline || node_ready(&bins.kubectl, kubeconfig)
    })?;
    if Instant::now() > deadline {
        bail!("the Node {NODE_NAME} was not Ready within {NODE_READY_TIMEOUT:?}");
    }
    // The kubelet registers the Node with the `not-ready` taint; the node
    // lifecycle controller would lift it now. That controller is not run: it
    // would mark the control-plane tier's kubelet-less Node objects unready
    // and evict their pods. Lift the taint as it would.
    run_cmd(
        Command::new(&bins.kubectl)
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args([
                "taint",
                "node",
                NODE_NAME,
                "node.kubernetes.io/not-ready:NoSchedule-",
            ]),
    )?;

    // kube-scheduler
    let args = vec![
        format!("--kubeconfig={}", kubeconfig.display()),
        format!("--authentication-kubeconfig={}", kubeconfig.display()),
        format!("--authorization-kubeconfig={}", kubeconfig.display()),
        "--leader-elect=false".to_owned(),
        "--secure-port=0".to_owned(),
        "--v=1".to_owned(),
    ];
    let mut scheduler = spawn(state, "kube-scheduler", &bins.scheduler, &args)?;
    let started = Instant::now();
    wait_for(
        state,
        &mut scheduler,
        "kube-scheduler to stay up for 2 s",
        || started.elapsed() > Duration::from_secs(2),
    )?;
    if !kubectl_ok(bins, kubeconfig, &["get", "node", NODE_NAME]) {
        bail!("the Node {NODE_NAME} vanished");
    }
    eprintln!(
        "testenv: node {NODE_NAME} Ready (containerd {CONTAINERD_VERSION}, runc {RUNC}, cgroup root /{CGROUP_ROOT})"
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// Down

/// SIGKILLs `pids` and waits (up to 10 s) until they are gone.
fn kill_all(pids: &[i32]) {
    for &pid in pids.iter().filter(|&&p| p > 0) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline
        && pids
            .iter()
            .any(|p| Path::new(&format!("/proc/{p}")).exists() && !is_zombie(*p))
    {
        sleep(Duration::from_millis(50));
    }
}

fn is_zombie(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

/// Processes running our cached shim binary (containerd started them).
fn our_shims(shim: &Path) -> Vec<i32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| runs(*pid, shim))
        .collect()
}

/// Undoes what the node did to the machine, after its processes (containerd,
/// kubelet, scheduler) were stopped. Best effort: every step runs, and what
/// failed is reported together.
pub(super) fn clean_up(state: &StateDir) -> anyhow::Result<()> {
    let node = NodeDir::new(state);
    let mut errors = Vec::new();
    // The containers, then the shims that watched them.
    for round in 0..3 {
        let pids = node_processes();
        if pids.is_empty() {
            break;
        }
        if round == 0 {
            eprintln!(
                "testenv: stopping {} container processes of the node",
                pids.len()
            );
        }
        kill_all(&pids);
    }
    let shims = our_shims(&NodeBinaries::cached().shim);
    if !shims.is_empty() {
        eprintln!("testenv: stopping {} containerd shims", shims.len());
        kill_all(&shims);
    }
    for m in mounts_below(&node.root) {
        let ok = Command::new("umount")
            .arg("-l")
            .arg(&m)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            errors.push(format!("umount {}", m.display()));
        }
    }
    if Path::new(&format!("/sys/class/net/{BRIDGE}")).exists() {
        let ok = Command::new("ip")
            .args(["link", "delete", BRIDGE])
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            errors.push(format!("ip link delete {BRIDGE}"));
        }
    }
    errors.extend(remove_cgroup_root());
    errors.extend(restore_sysctls(&node));
    // Links the kubelet makes in /var/log/containers to our pod logs.
    if let Ok(entries) = fs::read_dir("/var/log/containers") {
        for e in entries.flatten() {
            if fs::read_link(e.path()).is_ok_and(|t| t.starts_with(node.pod_logs())) {
                let _ = fs::remove_file(e.path());
            }
        }
    }
    // CNI results of our pods (libcni's cache directory is fixed): the ones of
    // our network and of the loopback plugin that were not there before `up`.
    let before: Vec<String> = fs::read_to_string(node.cni_results_before())
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect();
    for name in cni_results() {
        if (name.starts_with(NETWORK) || name.starts_with("cni-loopback-"))
            && !before.contains(&name)
        {
            let _ = fs::remove_file(Path::new(CNI_RESULTS).join(&name));
        }
    }
    let created = fs::read_to_string(node.host_dirs_created()).unwrap_or_default();
    for dir in created.lines().filter(|d| HOST_DIRS.contains(d)) {
        if let Err(e) = fs::remove_dir_all(dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            errors.push(format!("remove {dir}: {e}"));
        }
    }
    if errors.is_empty() && node.root.exists() {
        fs::remove_dir_all(&node.root)
            .with_context(|| format!("remove {}", node.root.display()))?;
    }
    if !errors.is_empty() {
        bail!(
            "the test node left things behind ({} kept for another `down`): {}",
            node.root.display(),
            errors.join("; ")
        );
    }
    Ok(())
}

/// Whether the kubelet's healthz answers (for `status`).
pub(super) fn kubelet_healthy(state: &StateDir) -> bool {
    let node = NodeDir::new(state);
    let Ok(cfg) = fs::read_to_string(node.root.join("kubelet.yaml")) else {
        return false;
    };
    cfg.lines()
        .find_map(|l| l.strip_prefix("healthzPort: "))
        .and_then(|p| p.trim().parse::<u16>().ok())
        .is_some_and(|p| TcpStream::connect(("127.0.0.1", p)).is_ok())
}

// ---------------------------------------------------------------------------
// The end-to-end scenario's view of this node

/// `deploy/` as users apply it, with what this node needs on top: host
/// networking (pods cannot reach an API server on the host's loopback), the
/// API server's address, a free metrics port, and the node's label.
fn deploy_overlay(dir: &Path, apiserver_port: u16, metrics_port: u16) -> String {
    // kustomize takes only relative paths to other kustomizations.
    let base = relative(dir, &workspace_root().join("deploy"));
    format!(
        r#"apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - {base}
patches:
  - target:
      kind: DaemonSet
      name: mbcas
    patch: |-
      - op: add
        path: /spec/template/spec/hostNetwork
        value: true
      - op: add
        path: /spec/template/spec/dnsPolicy
        value: ClusterFirstWithHostNet
      - op: add
        path: /spec/template/spec/nodeSelector
        value:
          {NODE_LABEL}: "true"
      - op: replace
        path: /spec/template/spec/containers/0/ports/0/containerPort
        value: {metrics_port}
  - patch: |-
      apiVersion: apps/v1
      kind: DaemonSet
      metadata:
        name: mbcas
        namespace: mbcas-system
      spec:
        template:
          spec:
            containers:
              - name: mbcas
                env:
                  - name: KUBERNETES_SERVICE_HOST
                    value: "127.0.0.1"
                  - name: KUBERNETES_SERVICE_PORT
                    value: "{apiserver_port}"
                  # The kubelet probes a host-network pod at the node's IP.
                  - name: MBCAS_METRICS_ADDR
                    value: "0.0.0.0:{metrics_port}"
# Written by `cargo xtask testenv up --with-node` in {dir}.
"#,
        base = base.display(),
        dir = dir.display(),
    )
}

/// `to` as seen from the directory `from` (both absolute).
fn relative(from: &Path, to: &Path) -> PathBuf {
    let from: Vec<_> = from.components().collect();
    let to: Vec<_> = to.components().collect();
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut out = PathBuf::new();
    for _ in common..from.len() {
        out.push("..");
    }
    for c in &to[common..] {
        out.push(c);
    }
    out
}

/// The running test node, for [`crate::e2e::Cluster`].
pub struct TestNode {
    kubectl: PathBuf,
    kubeconfig: PathBuf,
    overlay: PathBuf,
    apiserver_port: u16,
    /// Where the DaemonSet's pod serves `/metrics` (host network).
    pub metrics: std::net::SocketAddr,
}

impl TestNode {
    /// The node of the default test environment; it must be up.
    pub fn running() -> anyhow::Result<Self> {
        let state = StateDir::new(None);
        if !is_up(&state) {
            bail!("the test node is not up: run `cargo xtask testenv up --with-node` first");
        }
        let kubeconfig = state.kubeconfig();
        let config = kube::config::Kubeconfig::read_from(&kubeconfig)
            .with_context(|| format!("read {}", kubeconfig.display()))?;
        let port = config
            .clusters
            .iter()
            .find_map(|c| {
                let server = c.cluster.as_ref()?.server.as_deref()?;
                server
                    .rsplit_once(':')?
                    .1
                    .trim_end_matches('/')
                    .parse::<u16>()
                    .ok()
            })
            .with_context(|| format!("{}: no API server port", kubeconfig.display()))?;
        let [metrics] = free_ports()?;
        let overlay = NodeDir::new(&state).root.join("deploy");
        write_file(
            &overlay.join("kustomization.yaml"),
            &deploy_overlay(&overlay, port, metrics),
        )?;
        Ok(Self {
            kubectl: Binaries::cached().kubectl,
            kubeconfig,
            overlay,
            apiserver_port: port,
            metrics: std::net::SocketAddr::from(([127, 0, 0, 1], metrics)),
        })
    }
}

impl TestNode {
    /// The log files of the DaemonSet's pods (the kubelet's, CRI format).
    pub fn daemon_log_files(&self) -> Vec<PathBuf> {
        let logs = NodeDir::new(&StateDir::new(None)).pod_logs();
        let mut out = Vec::new();
        for e in fs::read_dir(&logs).into_iter().flatten().flatten() {
            if e.file_name().to_string_lossy().starts_with("mbcas-system_") {
                out.extend(
                    fs::read_dir(e.path().join("mbcas"))
                        .into_iter()
                        .flatten()
                        .flatten()
                        .map(|f| f.path()),
                );
            }
        }
        out
    }

    /// Builds an image of `files` (source on this machine → path in the
    /// image) with `entrypoint`, named `name`, and imports it into the node's
    /// containerd (pods use it with `imagePullPolicy: Never`).
    pub fn import_image(
        &self,
        name: &str,
        files: &[(PathBuf, PathBuf)],
        entrypoint: &[&str],
    ) -> anyhow::Result<()> {
        let node = NodeDir::new(&StateDir::new(None));
        let archive = oci_archive(&node.root.join("images"), name, files, entrypoint)?;
        run_cmd(
            Command::new(&NodeBinaries::cached().ctr)
                .arg("--address")
                .arg(node.socket())
                .args([
                    "-n",
                    "k8s.io",
                    "images",
                    "import",
                    "--snapshotter",
                    "overlayfs",
                ])
                .arg(&archive),
        )?;
        Ok(())
    }
}

impl crate::e2e::Cluster for TestNode {
    fn kubectl(&self) -> Command {
        let mut c = Command::new(&self.kubectl);
        c.arg("--kubeconfig").arg(&self.kubeconfig);
        c
    }
    fn on_node(&self, node: &str, script: &str) -> anyhow::Result<String> {
        if node != NODE_NAME {
            bail!("the pod runs on {node:?}, not on the test node {NODE_NAME}");
        }
        output_of(Command::new("sh").args(["-c", script]))
            .with_context(|| format!("sh -c {script:?} failed"))
    }
    fn deploy_dir(&self) -> PathBuf {
        self.overlay.clone()
    }
    fn kubeconfig(&self) -> Option<PathBuf> {
        Some(self.kubeconfig.clone())
    }
    fn image(&self) -> &str {
        MBCAS_IMAGE
    }
    fn restart(&self, component: &str, down: Duration) -> anyhow::Result<bool> {
        let state = StateDir::new(None);
        super::kill_component(&state, component)?;
        sleep(down);
        super::start_component(&state, component)?;
        if component == "kubelet" {
            let deadline = Instant::now() + NODE_READY_TIMEOUT;
            while !node_ready(&self.kubectl, &self.kubeconfig) {
                if Instant::now() > deadline {
                    bail!("the Node {NODE_NAME} was not Ready again within {NODE_READY_TIMEOUT:?}");
                }
                sleep(Duration::from_secs(1));
            }
        }
        Ok(true)
    }
    fn daemon_log(&self) -> String {
        // The kubelet's API listens on loopback only, so `kubectl logs` cannot
        // reach it through the API server: read the log files it writes.
        let mut out = String::new();
        for f in self.daemon_log_files() {
            out.push_str(&format!("{}:\n{}\n", f.display(), super::log_tail(&f, 40)));
        }
        if out.is_empty() {
            format!(
                "(no MBCAS pod logs under {})",
                NodeDir::new(&StateDir::new(None)).pod_logs().display()
            )
        } else {
            out
        }
    }

    fn metrics(&self) -> Option<std::net::SocketAddr> {
        Some(self.metrics)
    }

    /// What [`deploy_overlay`] changes, as the chart's values.
    fn helm_values(&self) -> serde_json::Value {
        serde_json::json!({
            "hostNetwork": true,
            "dnsPolicy": "ClusterFirstWithHostNet",
            "nodeSelector": {NODE_LABEL: "true"},
            "metrics": {"port": self.metrics.port()},
            "apiServer": {"host": "127.0.0.1", "port": self.apiserver_port.to_string()},
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn containerd_config_keeps_everything_under_the_node_dir() {
        let t = containerd_toml(Path::new("/s/node"), Path::new("/c/shim"));
        assert!(t.starts_with("version = 3\n"), "{t}");
        for want in [
            "root = \"/s/node/containerd/root\"",
            "address = \"/s/node/run/containerd.sock\"",
            "restrict_oom_score_adj = true",
            "runtime_path = \"/c/shim\"",
            "BinaryName = \"/usr/sbin/runc\"",
            "Root = \"/s/node/runc\"",
            "sandbox = \"localhost/mbcas-testenv/pause:1\"",
            "conf_dir = \"/s/node/cni/net.d\"",
            "netns_mounts_under_state_dir = true",
        ] {
            assert!(t.contains(want), "missing {want:?} in\n{t}");
        }
    }

    #[test]
    fn cni_and_kubelet_configs() {
        let c: serde_json::Value =
            serde_json::from_str(&cni_conflist(Path::new("/s/node"))).unwrap_or_default();
        assert_eq!(c["plugins"][0]["bridge"], BRIDGE);
        assert_eq!(c["plugins"][0]["ipam"]["dataDir"], "/s/node/cni/ipam");
        assert_eq!(c["plugins"][1]["type"], "loopback");
        let k = kubelet_yaml(Path::new("/s/node"), 1234, 5678);
        assert!(k.contains("cgroupRoot: /mbcas-node\n"), "{k}");
        assert!(
            k.contains("port: 1234\n") && k.contains("healthzPort: 5678\n"),
            "{k}"
        );
        assert!(k.contains("containerRuntimeEndpoint: unix:///s/node/run/containerd.sock\n"));
    }

    #[test]
    fn node_ip_is_the_first_global_address_not_ours() {
        let out = "5: mbcas0    inet 10.89.0.1/24 brd 10.89.0.255 scope global mbcas0\\\n\
                   4: eth0    inet 192.0.2.2/24 brd 192.0.2.255 scope global eth0\\       valid_lft forever\n";
        assert_eq!(parse_node_ip(out).as_deref(), Some("192.0.2.2"));
        assert_eq!(parse_node_ip(""), None);
    }

    #[test]
    fn relative_paths_for_kustomize() {
        assert_eq!(
            relative(
                Path::new("/w/target/testenv/node/deploy"),
                Path::new("/w/deploy")
            ),
            PathBuf::from("../../../../deploy")
        );
        assert_eq!(
            relative(Path::new("/a"), Path::new("/a/b")),
            PathBuf::from("b")
        );
    }

    #[test]
    fn mounts_below_sorts_deepest_first() {
        // /proc is mounted on every Linux machine, /proc/sys/fs/binfmt_misc often.
        let m = mounts_below(Path::new("/"));
        assert!(!m.is_empty());
        let depths: Vec<usize> = m.iter().map(|p| p.components().count()).collect();
        assert!(depths.windows(2).all(|w| w[0] >= w[1]), "{m:?}");
    }
}
