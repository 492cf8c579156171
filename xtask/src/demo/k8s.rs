//! `cargo xtask demo --kubernetes`: the demo's four consumers as real pods on
//! the test environment's node (started here when it is not up, stopped
//! again), one container each running `mbcas burn` with the consumer's load,
//! CPU requests in the consumers' weight ratio (`cpu.shares` follow requests).
//! Phase 1: 300m limits and no MBCAS; phase 2: no limits; phase 3: 300m limits
//! and MBCAS as its DaemonSet (`deploy/` through the test node's overlay),
//! resizing the pods in place. The table and the charts read the containers'
//! cgroups on the node, as the local demo reads its own.

use std::path::PathBuf;

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use super::{Phase, SPECS, START_LIMIT_M, Source, read_counters, run_phase};
use crate::{
    e2e::{self, Cluster as _},
    host::CgroupRoots,
    testenv::{self, node::TestNode},
};

const NS: &str = "mbcas-demo";

/// The consumers' pods of one phase and their container cgroups.
struct Pods<'a> {
    node: &'a TestNode,
    /// `(consumer, cpu dir, cpuacct dir)`.
    dirs: Vec<(&'static str, PathBuf, Option<PathBuf>)>,
    v2: bool,
    mbcas: bool,
}

impl Source for Pods<'_> {
    fn read(&self, name: &str) -> anyhow::Result<super::Reading> {
        let (_, dir, acct) = self
            .dirs
            .iter()
            .find(|(n, _, _)| *n == name)
            .with_context(|| format!("no pod for consumer {name}"))?;
        read_counters(dir, acct.as_deref(), self.v2)
    }
    fn reasons(&self) -> Vec<(String, String)> {
        if !self.mbcas {
            return Vec::new();
        }
        e2e::kubectl(
            self.node,
            &[
                "-n",
                NS,
                "get",
                "podallocations",
                "-o",
                "jsonpath={range .items[*]}{.metadata.name}={.spec.reason}{\"\\n\"}{end}",
            ],
        )
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(n, r)| (n.to_owned(), r.to_owned()))
        .collect()
    }
}

/// A consumer's CPU request: its weight in the ratio of `cpu.shares` (1024 ↔ 100m).
fn request_m(shares: u64) -> u64 {
    shares * 100 / 1024
}

fn pod(name: &str, image: &str, shares: u64, burn: &[&str], limit: Option<u64>) -> Value {
    let mut args = vec!["burn"];
    args.extend(burn);
    let mut limits = json!({"memory": "64Mi"});
    if let Some(l) = limit {
        limits["cpu"] = json!(format!("{l}m"));
    }
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "containers": [{
                "name": "load",
                "image": image,
                "imagePullPolicy": "IfNotPresent",
                "args": args,
                "resources": {
                    "requests": {"cpu": format!("{}m", request_m(shares)), "memory": "16Mi"},
                    "limits": limits,
                },
            }],
            "automountServiceAccountToken": false,
            "terminationGracePeriodSeconds": 1,
        },
    })
}

fn clear(node: &TestNode) {
    let _ = e2e::kubectl(
        node,
        &[
            "delete",
            "namespace",
            NS,
            "--ignore-not-found",
            "--wait=true",
        ],
    );
}

/// Starts the four pods (fresh loads) and finds their containers' cgroups.
fn start<'a>(node: &'a TestNode, limit: Option<u64>, mbcas: bool) -> anyhow::Result<Pods<'a>> {
    clear(node);
    e2e::kubectl(node, &["create", "namespace", NS])?;
    for s in &SPECS {
        e2e::apply(node, &pod(s.name, node.image(), s.shares, s.burn, limit))?;
    }
    e2e::wait_pods_ready(node, NS, "120s")?;
    let roots = CgroupRoots::detect()?;
    let mut dirs = Vec::new();
    for s in &SPECS {
        let view = e2e::pod_view(node, NS, s.name)?;
        let dir = PathBuf::from(e2e::cgroup_dir(node, &view.node, &e2e::first(&view)?.id)?);
        let acct = match (&roots.cpuacct, dir.strip_prefix(&roots.cpu)) {
            (Some(a), Ok(rel)) => Some(a.join(rel)),
            _ => None,
        };
        dirs.push((s.name, dir, acct));
    }
    Ok(Pods {
        node,
        dirs,
        v2: roots.v2,
        mbcas,
    })
}

fn daemon_gone(node: &TestNode) -> anyhow::Result<()> {
    e2e::kubectl(
        node,
        &[
            "-n",
            "mbcas-system",
            "delete",
            "daemonset",
            "mbcas",
            "--ignore-not-found",
            "--wait=true",
        ],
    )?;
    e2e::wait_until(
        "the MBCAS pod to go",
        std::time::Duration::from_secs(60),
        std::time::Duration::from_secs(1),
        || {
            let out = e2e::kubectl(
                node,
                &[
                    "-n",
                    "mbcas-system",
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
    )
}

fn all_phases(third: u64) -> anyhow::Result<[Phase; 3]> {
    let node = TestNode::running()?;
    daemon_gone(&node)?;
    let pods = start(&node, Some(START_LIMIT_M), false)?;
    let stat = run_phase(&pods, "static limits (pods)", third, None)?;
    let pods = start(&node, None, false)?;
    let open = run_phase(&pods, "no limits (pods)", third, None)?;
    e2e::kubectl(
        &node,
        &["apply", "-k", &node.deploy_dir().display().to_string()],
    )?;
    e2e::kubectl(
        &node,
        &[
            "-n",
            "mbcas-system",
            "rollout",
            "status",
            "daemonset/mbcas",
            "--timeout=180s",
        ],
    )?;
    let pods = start(&node, Some(START_LIMIT_M), true)?;
    let mb = run_phase(&pods, "MBCAS (DaemonSet, pods/resize)", third, None)?;
    if mb.changes == 0 {
        bail!("MBCAS changed no limit of the demo's pods");
    }
    Ok([stat, open, mb])
}

/// The three phases on the test node; the pods and the DaemonSet are removed
/// afterwards, and the node too when it was started here.
pub fn phases(third: u64) -> anyhow::Result<[Phase; 3]> {
    let (_, started) = testenv::up(true, true)?;
    let result = all_phases(third);
    if let Ok(node) = TestNode::running() {
        clear(&node);
        let _ = daemon_gone(&node);
    }
    if started {
        testenv::down()?;
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_follow_the_weights() {
        let r: Vec<u64> = SPECS.iter().map(|s| request_m(s.shares)).collect();
        assert_eq!(r, [200, 100, 50, 100]);
        let p = pod("web", "img", 2048, &["--threads", "1"], None);
        assert!(p["spec"]["containers"][0]["resources"]["limits"]["cpu"].is_null());
        let p = pod("web", "img", 2048, &[], Some(300));
        assert_eq!(
            p["spec"]["containers"][0]["resources"]["limits"]["cpu"],
            "300m"
        );
        assert_eq!(p["spec"]["containers"][0]["args"][0], "burn");
    }
}
