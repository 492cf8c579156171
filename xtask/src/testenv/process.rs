//! The state directory, the processes `up` started (recorded by pid and
//! executable), starting, waiting for and stopping them.

use std::{
    fs::{self, File},
    io::Write as _,
    net::TcpListener,
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

use super::*;

/// `target/testenv/` and what lives in it.
pub(super) struct StateDir {
    pub(super) root: PathBuf,
}

impl StateDir {
    pub(super) fn new(dir: Option<&Path>) -> Self {
        let root = dir.map_or_else(
            || workspace_root().join("target/testenv"),
            Path::to_path_buf,
        );
        // Absolute, so the kubeconfig and the recorded flags work from anywhere.
        let root = std::path::absolute(&root).unwrap_or(root);
        Self { root }
    }
    pub(super) fn args(&self, name: &str) -> PathBuf {
        self.root.join(format!("{name}.args"))
    }
    pub(super) fn kubeconfig(&self) -> PathBuf {
        self.root.join("kubeconfig")
    }
    pub(super) fn pids(&self) -> PathBuf {
        self.root.join("pids")
    }
    pub(super) fn logs(&self) -> PathBuf {
        self.root.join("logs")
    }
    pub(super) fn pki(&self) -> PathBuf {
        self.root.join("pki")
    }
    pub(super) fn data(&self) -> PathBuf {
        self.root.join("data")
    }
}

/// One process `up` started: its name, pid and the executable it ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Started {
    pub(super) name: String,
    pub(super) pid: i32,
    pub(super) exe: PathBuf,
}

pub(super) fn parse_pids(text: &str) -> Vec<Started> {
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

pub(super) fn read_pids(state: &StateDir) -> Vec<Started> {
    fs::read_to_string(state.pids())
        .map(|t| parse_pids(&t))
        .unwrap_or_default()
}

pub(super) fn record_pid(state: &StateDir, s: &Started) -> anyhow::Result<()> {
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
pub(super) fn runs(pid: i32, exe: &Path) -> bool {
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

pub(super) fn is_up(state: &StateDir) -> bool {
    let pids = read_pids(state);
    !pids.is_empty() && pids.iter().all(|s| runs(s.pid, &s.exe)) && state.kubeconfig().is_file()
}

/// SIGTERM, wait up to 10 s, then SIGKILL; only if `s.pid` still runs `s.exe`.
pub(super) fn stop(s: &Started) {
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
pub(super) fn lock(state: &StateDir) -> anyhow::Result<File> {
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
pub(super) const STOP_ORDER: &[&str] = &[
    "kube-scheduler",
    "kubelet",
    "containerd",
    "kube-controller-manager",
    "kube-apiserver",
    "etcd",
];

pub(super) fn stop_all(state: &StateDir) -> anyhow::Result<()> {
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

/// `N` distinct free TCP ports on loopback (the kernel's pick; all held until
/// all are chosen, then released for the caller to use).
pub(super) fn free_ports<const N: usize>() -> anyhow::Result<[u16; N]> {
    let mut held = Vec::with_capacity(N);
    let mut ports = [0; N];
    for port in &mut ports {
        let l = TcpListener::bind("127.0.0.1:0").context("bind 127.0.0.1:0")?;
        *port = l.local_addr().context("local_addr")?.port();
        held.push(l);
    }
    Ok(ports)
}

pub(super) fn log_tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

pub(super) fn spawn(
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
pub(super) fn wait_for(
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

pub(super) fn kubectl_ok(bins: &Binaries, kubeconfig: &Path, args: &[&str]) -> bool {
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
