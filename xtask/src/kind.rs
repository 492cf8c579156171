//! `cargo xtask kind-up | kind-e2e | kind-down`: MBCAS on a local Kind cluster.
//!
//! For users with a Docker engine, `kind` and `kubectl`; none of them exists on
//! the development machine, so these commands check for them first and stop
//! with a message naming what is missing. Nothing here is part of CI.
//!
//! * `kind-up`: create the cluster from `deploy/kind-config.yaml` (Kubernetes
//!   1.35, in-place resize GA), build the image from `Dockerfile`, load it into
//!   the nodes, `kubectl apply -k deploy/`, wait for the DaemonSet.
//! * `kind-e2e`: run a CPU-bound Burstable pod whose limit is below its demand
//!   and wait until MBCAS has raised the limit in place (no restart).
//! * `kind-down`: delete the cluster.

use std::{
    path::{Path, PathBuf},
    process::Command,
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::setup::{output_of, run_cmd};

const CLUSTER: &str = "mbcas";
const CONTEXT: &str = "kind-mbcas";
const IMAGE: &str = "mbcas:dev";
const E2E_NAMESPACE: &str = "mbcas-e2e";
const E2E_POD: &str = "burner";
/// The burner's CPU limit; MBCAS must raise it.
const E2E_LIMIT_MILLIS: u64 = 200;

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

/// Parses a CPU quantity as kubectl prints it (`200m`, `1`, `1.5`) into millicores.
fn millicores(q: &str) -> Option<u64> {
    let q = q.trim();
    match q.strip_suffix('m') {
        Some(m) => m.parse().ok(),
        None => q.parse::<f64>().ok().map(|c| (c * 1000.0).round() as u64),
    }
}

pub fn e2e(_opts: &Options) -> anyhow::Result<()> {
    check_prerequisites("kind-e2e")?;
    let pod = format!(
        r#"{{"apiVersion":"v1","kind":"Pod","metadata":{{"name":"{E2E_POD}","namespace":"{E2E_NAMESPACE}"}},
"spec":{{"containers":[{{"name":"burn","image":"busybox:1.36","command":["sh","-c","while :; do :; done"],
"resources":{{"requests":{{"cpu":"100m"}},"limits":{{"cpu":"{E2E_LIMIT_MILLIS}m"}}}}}}]}}}}"#
    );
    let _ = output_of(kubectl().args(["create", "namespace", E2E_NAMESPACE]));
    let _ = output_of(kubectl().args([
        "-n",
        E2E_NAMESPACE,
        "delete",
        "pod",
        E2E_POD,
        "--ignore-not-found",
        "--wait=true",
    ]));
    let mut apply = kubectl();
    apply.args(["apply", "-f", "-"]);
    pipe(&mut apply, &pod)?;
    run_cmd(kubectl().args([
        "-n",
        E2E_NAMESPACE,
        "wait",
        "--for=condition=Ready",
        &format!("pod/{E2E_POD}"),
        "--timeout=120s",
    ]))?;
    eprintln!(
        "kind-e2e: {E2E_POD} burns CPU under a {E2E_LIMIT_MILLIS}m limit; waiting for MBCAS to raise it"
    );
    let deadline = Instant::now() + Duration::from_secs(180);
    let result = loop {
        let limit = output_of(kubectl().args([
            "-n", E2E_NAMESPACE, "get", "pod", E2E_POD, "-o",
            "jsonpath={.spec.containers[0].resources.limits.cpu} {.status.containerStatuses[0].restartCount}",
        ]))
        .unwrap_or_default();
        let mut fields = limit.split_whitespace();
        let millis = fields.next().and_then(millicores);
        let restarts = fields.next().unwrap_or("0");
        if let Some(m) = millis.filter(|&m| m > E2E_LIMIT_MILLIS) {
            if restarts != "0" {
                break Err(anyhow::anyhow!(
                    "limit raised to {m}m but the container restarted {restarts} times"
                ));
            }
            break Ok(m);
        }
        if Instant::now() > deadline {
            break Err(anyhow::anyhow!(
                "the limit is still {} after 180 s; see kubectl --context {CONTEXT} -n mbcas-system logs ds/mbcas",
                millis.map_or("unknown".into(), |m| format!("{m}m"))
            ));
        }
        sleep(Duration::from_secs(3));
    };
    let _ = output_of(kubectl().args(["-n", E2E_NAMESPACE, "get", "podallocations", "-o", "wide"]))
        .map(|s| eprintln!("{s}"));
    let _ = output_of(kubectl().args(["delete", "namespace", E2E_NAMESPACE, "--wait=false"]));
    let m = result?;
    eprintln!(
        "kind-e2e: passed: MBCAS raised {E2E_POD}'s CPU limit from {E2E_LIMIT_MILLIS}m to {m}m in place"
    );
    Ok(())
}

fn pipe(cmd: &mut Command, input: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("failed to start {cmd:?}"))?;
    child
        .stdin
        .take()
        .context("no stdin")?
        .write_all(input.as_bytes())?;
    let status = child.wait()?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
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

    #[test]
    fn quantities() {
        assert_eq!(millicores("200m"), Some(200));
        assert_eq!(millicores("1.5"), Some(1500));
        assert_eq!(millicores("2"), Some(2000));
        assert_eq!(millicores(""), None);
    }
}
