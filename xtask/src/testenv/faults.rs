//! Fault injection, one component at a time: `kill` and `start` with the
//! flags, ports and credentials it had.

use std::{
    fs::{self},
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use super::*;

pub(super) fn component(state: &StateDir, name: &str) -> anyhow::Result<Started> {
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

pub(super) fn kill_component(state: &StateDir, name: &str) -> anyhow::Result<()> {
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

pub(super) fn start_component(state: &StateDir, name: &str) -> anyhow::Result<()> {
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
