//! `cargo xtask soak --node --minutes N`: the DaemonSet on the test
//! environment's real node under pod churn, watched for leaks.
//!
//! Every 3 s a pod is created in namespace `mbcas-soak` and, once six are
//! alive, the oldest is deleted: single-container burners at a random load
//! (5–100 % of a core) under a random limit (200–500 m), a two-container pod
//! (a burner and an idle sidecar) every fourth, a Guaranteed pod every fifth.
//! Every 15 s the daemon's RSS, open file descriptors and `/metrics` are read.
//! It fails when
//! * the daemon's process changed (it restarted) or its log has a panic;
//! * RSS grew by more than 20 % (+ 4 MiB) from the end of the first minute,
//!   or file descriptors by more than 4;
//! * once every soak pod is gone, a PodAllocation or a per-pod series of one
//!   is left (30 s for the daemon's garbage collection);
//! * a `pods/resize` request was answered 404 (sent to a pod that was gone);
//! * after the first minute, the daemon manages none of the soak pods for
//!   60 s (four samples in a row): it stopped deciding.

use std::{
    collections::VecDeque,
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::bail;

use super::{Growth, Sample, fds, growth, metrics};
use crate::{
    e2e::{self, Cluster as _},
    testenv::node::TestNode,
};

const NS: &str = "mbcas-soak";
/// Pods alive at once (the node has two cores; each burner wants some).
const ALIVE: usize = 6;

/// `pods/resize` requests the API server answered 404 so far.
fn resize_not_found(node: &TestNode) -> anyhow::Result<f64> {
    let text = e2e::kubectl(node, &["get", "--raw", "/metrics"])?;
    Ok(text
        .lines()
        .filter_map(|l| l.strip_prefix("apiserver_request_total{"))
        .filter(|l| {
            l.contains("resource=\"pods\"")
                && l.contains("subresource=\"resize\"")
                && l.contains("code=\"404\"")
        })
        .filter_map(|l| l.rsplit_once('}')?.1.trim().parse::<f64>().ok())
        .sum())
}

/// Per-pod series of the soak's pods in a `/metrics` text.
fn soak_series(text: &str) -> usize {
    text.lines()
        .filter(|l| l.starts_with("mbcas_pod_allocation_cores{"))
        .filter(|l| l.contains(&format!("namespace=\"{NS}\"")))
        .count()
}

fn soak_pod(image: &str, i: u64, seed: u64) -> serde_json::Value {
    let percent = (5 + seed % 96).to_string();
    let limit = 200 + (seed >> 8) % 31 * 10;
    let name = format!("churn-{i}");
    let burn = &["--percent", percent.as_str()];
    if i % 5 == 4 {
        // Guaranteed: requests = limits, memory too.
        let mut p = e2e::pod(
            NS,
            &name,
            vec![e2e::container("burn", image, 200, 200, &[])],
        );
        p["spec"]["containers"][0]["resources"]["requests"]["memory"] = "64Mi".into();
        p
    } else if i % 4 == 3 {
        e2e::pod(
            NS,
            &name,
            vec![
                e2e::container("app", image, 50, limit, burn),
                e2e::container("sidecar", image, 20, 100, &["--percent", "1"]),
            ],
        )
    } else {
        e2e::pod(
            NS,
            &name,
            vec![e2e::container("burn", image, 100, limit, burn)],
        )
    }
}

pub fn run(minutes: u64) -> anyhow::Result<()> {
    let (_, started) = crate::testenv::up(true, true)?;
    let result = soak(minutes);
    if started {
        crate::testenv::down()?;
    }
    result
}

fn soak(minutes: u64) -> anyhow::Result<()> {
    let node = TestNode::running()?;
    crate::bench_node::deploy(&node)?;
    let _ = e2e::kubectl(&node, &["delete", "namespace", NS, "--wait=true"]);
    e2e::kubectl(&node, &["create", "namespace", NS])?;
    let result = churn(&node, minutes);
    let _ = e2e::kubectl(&node, &["delete", "namespace", NS, "--wait=false"]);
    result
}

fn churn(node: &TestNode, minutes: u64) -> anyhow::Result<()> {
    let pid = crate::bench_node::daemon_pid(node)?;
    let not_found0 = resize_not_found(node)?;
    let total = Duration::from_secs(minutes * 60);
    let t0 = Instant::now();
    let mut alive: VecDeque<String> = VecDeque::new();
    let (mut created, mut deleted) = (0u64, 0u64);
    let mut samples: Vec<Sample> = Vec::new();
    let mut next_sample = t0;
    let mut idle_samples = 0;
    let mut seed = 0x2545_f491_4f6c_dd1d_u64 ^ u64::from(pid);
    eprintln!(
        "soak-node: {minutes} min of pod churn on the test node ({ALIVE} pods alive, one created every 3 s); daemon pid {pid}"
    );
    while t0.elapsed() < total {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let pod = soak_pod(node.image(), created, seed);
        e2e::apply(node, &pod)?;
        alive.push_back(format!("churn-{created}"));
        created += 1;
        if alive.len() > ALIVE
            && let Some(old) = alive.pop_front()
        {
            e2e::kubectl(node, &["-n", NS, "delete", "pod", &old, "--wait=false"])?;
            deleted += 1;
        }
        if Instant::now() >= next_sample {
            let s = Sample {
                at_s: t0.elapsed().as_secs_f64(),
                rss_kib: crate::procs::status_kib(pid, "VmRSS"),
                fds: fds(pid),
                series: metrics(node.metrics).ok().map(|m| soak_series(&m)),
                alive: alive.len(),
            };
            eprintln!(
                "soak-node: {:>5.0} s  RSS {:>6.1} MiB  fds {:>3}  soak pods' series {:>3}  pods alive {}",
                s.at_s,
                s.rss_kib as f64 / 1024.0,
                s.fds,
                s.series.map_or("-".to_owned(), |n| n.to_string()),
                s.alive
            );
            // Alive: the daemon manages some of the six pods (a Guaranteed
            // one is left alone, a new one may not be measured yet); none
            // for a minute is a daemon that stopped deciding.
            idle_samples = if s.at_s > 60.0 && s.series == Some(0) {
                idle_samples + 1
            } else {
                0
            };
            samples.push(s);
            if idle_samples >= 4 {
                bail!(
                    "soak-node: for 60 s the daemon managed none of the {ALIVE} soak pods alive (it stopped deciding)"
                );
            }
            next_sample += Duration::from_secs(15);
        }
        if crate::bench_node::daemon_pid(node).ok() != Some(pid) {
            bail!("soak-node: the daemon's process changed (it restarted) during the soak");
        }
        sleep(Duration::from_secs(3));
    }
    // Every soak pod goes; the daemon must forget them all.
    e2e::kubectl(node, &["-n", NS, "delete", "pods", "--all", "--wait=true"])?;
    deleted += alive.len() as u64;
    let gone_at = Instant::now();
    let (left_pa, left_series) = loop {
        let pas = e2e::kubectl(node, &["-n", NS, "get", "podallocations", "-o", "name"])?;
        let pas = pas.lines().filter(|l| !l.trim().is_empty()).count();
        let series = metrics(node.metrics).ok().map(|m| soak_series(&m));
        if (pas == 0 && series == Some(0)) || gone_at.elapsed() > Duration::from_secs(30) {
            break (pas, series);
        }
        sleep(Duration::from_secs(2));
    };
    let not_found = resize_not_found(node)? - not_found0;
    let Growth {
        warm,
        last,
        peak_kib: peak,
        mut problems,
    } = growth(&samples, &node.daemon_log());
    println!(
        "soak-node: {minutes} min, {created} pods created, {deleted} deleted; daemon RSS {:.1} MiB at {:.0} s → {:.1} MiB at the end (peak {:.1}); fds {} → {}; left after the pods went: {left_pa} PodAllocations, {} series; pods/resize answered 404: {not_found:.0}",
        warm.rss_kib as f64 / 1024.0,
        warm.at_s,
        last.rss_kib as f64 / 1024.0,
        peak as f64 / 1024.0,
        warm.fds,
        last.fds,
        left_series.map_or("-".to_owned(), |n| n.to_string()),
    );
    if left_pa > 0 {
        problems.push(format!(
            "{left_pa} PodAllocations outlived their pods by 30 s"
        ));
    }
    match left_series {
        None => problems.push("/metrics did not answer at the end".to_owned()),
        Some(n) if n > 0 => problems.push(format!(
            "{n} per-pod series of deleted pods left after 30 s"
        )),
        Some(_) => {}
    }
    if not_found > 0.0 {
        problems.push(format!(
            "{not_found:.0} pods/resize requests to pods that were gone (404)"
        ));
    }
    if !problems.is_empty() {
        bail!("soak-node: {}", problems.join("; "));
    }
    println!("soak-node: 1 passed, 0 failed");
    Ok(())
}
