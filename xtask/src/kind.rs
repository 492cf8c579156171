//! `cargo xtask kind-up | kind-e2e | kind-down`: MBCAS on a local Kind cluster.
//!
//! For users with a Docker engine, `kind` and `kubectl`; none of them exists on
//! the development machine, so these commands check for them first and stop
//! with a message naming what is missing. Nothing here is part of CI.
//!
//! * `kind-up`: create the cluster from `deploy/kind-config.yaml` (Kubernetes
//!   1.35, in-place resize GA), build the image from `Dockerfile`, load it into
//!   the nodes, `kubectl apply -k deploy/`, wait for the DaemonSet.
//! * `kind-e2e`: the end-to-end scenario of [`crate::e2e`], the same checks
//!   the node tier runs on the test environment's real node.
//! * `kind-down`: delete the cluster.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::{
    cmd::{output_of, run_cmd},
    e2e::{self, Cluster},
};

const CLUSTER: &str = "mbcas";
const CONTEXT: &str = "kind-mbcas";
const IMAGE: &str = "mbcas:dev";

#[derive(Debug, clap::Args)]
pub struct Options {}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()))
}

/// What is missing for the Kind commands, given a PATH lookup and whether a
/// Docker engine answers. Empty when everything is there.
fn missing(has_tool: impl Fn(&str) -> bool, engine_answers: impl Fn() -> bool) -> Vec<String> {
    let mut out: Vec<String> = ["docker", "kind", "kubectl"]
        .into_iter()
        .filter(|t| !has_tool(t))
        .map(|t| format!("`{t}` is not on PATH"))
        .collect();
    if has_tool("docker") && !engine_answers() {
        out.push("`docker info` fails: no Docker engine is running or reachable".into());
    }
    out
}

fn check_prerequisites(command: &str) -> anyhow::Result<()> {
    let missing = missing(on_path, || {
        output_of(Command::new("docker").args(["info", "--format", "{{.ServerVersion}}"])).is_some()
    });
    if missing.is_empty() {
        return Ok(());
    }
    bail!(
        "cargo xtask {command} needs a Docker engine, kind and kubectl:\n  - {}\n\
         Install Docker and kind (https://kind.sigs.k8s.io/docs/user/quick-start/) and kubectl, \
         then run it again. The unit, kernel and control-plane tiers (`cargo xtask test`) need none of them.",
        missing.join("\n  - ")
    )
}

fn kubectl() -> Command {
    let mut c = Command::new("kubectl");
    c.args(["--context", CONTEXT]);
    c
}

pub fn up(_opts: &Options) -> anyhow::Result<()> {
    check_prerequisites("kind-up")?;
    let root = root();
    let clusters = output_of(Command::new("kind").args(["get", "clusters"])).unwrap_or_default();
    if clusters.lines().any(|l| l.trim() == CLUSTER) {
        eprintln!("kind-up: cluster {CLUSTER} exists");
    } else {
        run_cmd(
            Command::new("kind")
                .args(["create", "cluster", "--name", CLUSTER, "--config"])
                .arg(root.join("deploy/kind-config.yaml")),
        )?;
    }
    run_cmd(
        Command::new("docker")
            .args(["build", "-t", IMAGE])
            .arg(&root),
    )?;
    run_cmd(Command::new("kind").args(["load", "docker-image", IMAGE, "--name", CLUSTER]))?;
    run_cmd(kubectl().arg("apply").arg("-k").arg(root.join("deploy")))?;
    // A rebuilt image under the same tag needs new pods.
    run_cmd(kubectl().args([
        "-n",
        "mbcas-system",
        "rollout",
        "restart",
        "daemonset/mbcas",
    ]))?;
    run_cmd(kubectl().args([
        "-n",
        "mbcas-system",
        "rollout",
        "status",
        "daemonset/mbcas",
        "--timeout=180s",
    ]))?;
    eprintln!(
        "kind-up: MBCAS runs on every node of {CLUSTER} (kubectl --context {CONTEXT} -n mbcas-system get pods)"
    );
    Ok(())
}

/// Kind as a [`Cluster`] for the shared end-to-end scenario: nodes are
/// containers named after the node.
struct Kind;

impl Cluster for Kind {
    fn kubectl(&self) -> Command {
        kubectl()
    }
    fn on_node(&self, node: &str, script: &str) -> anyhow::Result<String> {
        output_of(Command::new("docker").args(["exec", node, "sh", "-c", script]))
            .with_context(|| format!("docker exec {node} sh -c {script:?} failed"))
    }
    fn deploy_dir(&self) -> PathBuf {
        root().join("deploy")
    }
    fn kubeconfig(&self) -> Option<PathBuf> {
        std::env::var_os("KUBECONFIG")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".kube/config")))
    }
    fn image(&self) -> &str {
        IMAGE
    }
    fn restart(&self, _component: &str, _down: std::time::Duration) -> anyhow::Result<bool> {
        // Kind's kubelet and containerd are systemd units inside node
        // containers, its API server a static pod: not restarted here.
        Ok(false)
    }
    fn daemon_log(&self) -> String {
        output_of(kubectl().args(["-n", "mbcas-system", "logs", "ds/mbcas", "--tail=40"]))
            .unwrap_or_else(|| "(kubectl logs failed)".into())
    }
}

pub fn e2e(_opts: &Options) -> anyhow::Result<()> {
    check_prerequisites("kind-e2e")?;
    let report = e2e::run_scenario(&Kind)?;
    eprintln!(
        "kind-e2e: {} checks passed on {CLUSTER}",
        report.passed.len()
    );
    Ok(())
}

pub fn down(_opts: &Options) -> anyhow::Result<()> {
    if !on_path("kind") {
        bail!("cargo xtask kind-down needs `kind` on PATH (nothing to delete without it)");
    }
    run_cmd(Command::new("kind").args(["delete", "cluster", "--name", CLUSTER]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_tools_are_named() {
        let m = missing(|t| t == "docker", || false);
        assert_eq!(
            m,
            [
                "`kind` is not on PATH",
                "`kubectl` is not on PATH",
                "`docker info` fails: no Docker engine is running or reachable"
            ]
        );
        assert!(missing(|_| true, || true).is_empty());
        assert_eq!(missing(|_| false, || true).len(), 3);
    }
}
