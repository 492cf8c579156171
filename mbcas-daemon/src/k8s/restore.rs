//! `mbcas restore`: put the recorded original CPU limits back and delete the
//! PodAllocations (the uninstall path). Stop the DaemonSet first, or the
//! daemon will decide again: `--stop-daemonset NAMESPACE/NAME` does it here
//! (deletes it in the foreground and waits until its pods are gone), which is
//! what the Helm chart's pre-delete hook runs.
//!
//! For each PodAllocation in scope: when its pod still exists with the same UID
//! and the status records original limits that differ from the pod's current
//! ones, the pod is resized back (CPU limits only, like the controller); then
//! the PodAllocation is deleted. A pod whose resize is refused keeps its
//! PodAllocation (so a later run can retry) and makes the command fail.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use k8s_openapi::api::{apps::v1::DaemonSet, core::v1::Pod};
use kube::{
    Api, Client, ResourceExt as _,
    api::{DeleteParams, ListParams},
};
use serde::Serialize;

use super::{
    crd::{NODE_LABEL, PodAllocation},
    pods::PodFacts,
};
use crate::units::MilliCpu;

#[derive(Debug, Clone, clap::Args)]
#[command(group(clap::ArgGroup::new("scope").required(true).args(["node_name", "all"])))]
pub struct RestoreArgs {
    /// Restore the pods of this node's PodAllocations.
    #[arg(long, value_name = "NODE")]
    pub node_name: Option<String>,
    /// Restore every PodAllocation in the cluster.
    #[arg(long)]
    pub all: bool,
    /// Kubeconfig to use instead of the in-cluster configuration.
    #[arg(long, env = "KUBECONFIG", value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// First delete this DaemonSet (the MBCAS daemons) and wait until its
    /// pods are gone, so that no daemon decides again after the restore.
    #[arg(long, value_name = "NAMESPACE/NAME", value_parser = parse_daemonset)]
    pub stop_daemonset: Option<(String, String)>,
    /// How long `--stop-daemonset` waits for the daemons' pods to go.
    #[arg(long, value_name = "DURATION", default_value = "2m",
          value_parser = crate::config::parse_duration)]
    pub stop_timeout: Duration,
}

/// `NAMESPACE/NAME`, both non-empty.
fn parse_daemonset(s: &str) -> Result<(String, String), String> {
    match s.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok((ns.to_owned(), name.to_owned()))
        }
        _ => Err(format!("expected NAMESPACE/NAME, got {s:?}")),
    }
}

#[derive(Debug, Default, Serialize, PartialEq)]
pub struct RestoreReport {
    /// Pods resized back to their original limits.
    pub restored: Vec<String>,
    /// Pods already at their original limits (or gone).
    pub unchanged: Vec<String>,
    /// PodAllocations deleted.
    pub deleted: usize,
    /// `namespace/name: why` for each pod that could not be restored.
    pub failed: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("listing PodAllocations")]
    List(#[source] kube::Error),
    #[error(transparent)]
    Client(#[from] super::client::ClientError),
    #[error("writing the report")]
    Json(#[from] serde_json::Error),
    #[error("stopping the DaemonSet {namespace}/{name}")]
    StopDaemonSet {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error(
        "the pods of the DaemonSet {namespace}/{name} were still there after {waited:?}: {left}"
    )]
    DaemonSetNotGone {
        namespace: String,
        name: String,
        waited: Duration,
        left: String,
    },
}

/// Deletes the DaemonSet with foreground propagation and waits until it and
/// every pod its selector matches are gone. `Ok(false)`: it did not exist.
pub async fn stop_daemonset(
    client: &Client,
    namespace: &str,
    name: &str,
    timeout: Duration,
) -> Result<bool, RestoreError> {
    let fail = |source| RestoreError::StopDaemonSet {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        source,
    };
    let sets: Api<DaemonSet> = Api::namespaced(client.clone(), namespace);
    let Some(set) = sets.get_opt(name).await.map_err(fail)? else {
        return Ok(false);
    };
    let selector = set
        .spec
        .as_ref()
        .and_then(|s| s.selector.match_labels.as_ref())
        .map(|labels| {
            labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default();
    match sets.delete(name, &DeleteParams::foreground()).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 404 => {}
        Err(e) => return Err(fail(e)),
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let started = tokio::time::Instant::now();
    loop {
        let set_left = sets.get_opt(name).await.map_err(fail)?.is_some();
        // An empty selector would match every pod of the namespace: then only
        // the DaemonSet's own disappearance (foreground: after its pods) counts.
        let pods_left: Vec<String> = if selector.is_empty() {
            Vec::new()
        } else {
            pods.list(&ListParams::default().labels(&selector))
                .await
                .map_err(fail)?
                .items
                .iter()
                .map(kube::ResourceExt::name_any)
                .collect()
        };
        if !set_left && pods_left.is_empty() {
            return Ok(true);
        }
        if started.elapsed() >= timeout {
            let mut left = pods_left;
            if set_left {
                left.insert(0, format!("daemonset/{name}"));
            }
            return Err(RestoreError::DaemonSetNotGone {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                waited: timeout,
                left: left.join(", "),
            });
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The patch that puts the original limits back, if any differ.
fn restore_changes(pa: &PodAllocation, pod: &PodFacts) -> Result<Vec<(String, MilliCpu)>, String> {
    let mut out = Vec::new();
    for o in pa.originals() {
        let Some(c) = pod.containers.iter().find(|c| c.name == o.name) else {
            continue;
        };
        match o.cpu_limit {
            Some(q) if c.limit != Some(q.millis()) => out.push((o.name.clone(), q.millis())),
            Some(_) => {}
            None if c.limit.is_some() => {
                return Err(format!(
                    "container {} had no CPU limit; a resize cannot remove one",
                    o.name
                ));
            }
            None => {}
        }
    }
    Ok(out)
}

pub async fn restore(client: Client, args: &RestoreArgs) -> Result<RestoreReport, RestoreError> {
    let api: Api<PodAllocation> = Api::all(client.clone());
    let lp = match &args.node_name {
        Some(node) if !args.all => ListParams::default().labels(&format!("{NODE_LABEL}={node}")),
        _ => ListParams::default(),
    };
    let list = api.list(&lp).await.map_err(RestoreError::List)?;
    let mut report = RestoreReport::default();
    for pa in list.items {
        let ns = pa.namespace().unwrap_or_default();
        let id = format!("{ns}/{}", pa.spec.pod_name);
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
        let pod = match pods.get_opt(&pa.spec.pod_name).await {
            Ok(p) => p,
            Err(e) => {
                report.failed.push(format!("{id}: reading the pod: {e}"));
                continue;
            }
        };
        let facts = pod
            .as_ref()
            .filter(|p| p.metadata.uid.as_deref() == Some(pa.spec.pod_uid.as_str()))
            .map(PodFacts::from_pod);
        let changes = match facts {
            None => Ok(Vec::new()),
            Some(Err(e)) => Err(e.to_string()),
            Some(Ok(f)) => restore_changes(&pa, &f),
        };
        match changes {
            Err(e) => {
                report.failed.push(format!("{id}: {e}"));
                continue;
            }
            Ok(c) if c.is_empty() => report.unchanged.push(id.clone()),
            Ok(c) => match super::resize::patch_resize(&pods, &pa.spec.pod_name, &c).await {
                Ok(_) => report.restored.push(id.clone()),
                Err(e) => {
                    report.failed.push(format!("{id}: resize refused: {e}"));
                    continue;
                }
            },
        }
        let pas: Api<PodAllocation> = Api::namespaced(client.clone(), &ns);
        match pas.delete(&pa.name_any(), &DeleteParams::default()).await {
            Ok(_) => report.deleted += 1,
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => report
                .failed
                .push(format!("{id}: deleting its PodAllocation: {e}")),
        }
    }
    Ok(report)
}

/// `mbcas restore`.
pub async fn run(args: &RestoreArgs) -> Result<ExitCode, RestoreError> {
    let client = super::client::client(args.kubeconfig.as_deref()).await?;
    if let Some((ns, name)) = &args.stop_daemonset {
        let stopped = stop_daemonset(&client, ns, name, args.stop_timeout).await?;
        if !args.json {
            println!(
                "daemonset {ns}/{name} {}",
                if stopped { "stopped" } else { "not found" }
            );
        }
    }
    let report = restore(client, args).await?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        for p in &report.restored {
            println!("restored  {p}");
        }
        for p in &report.failed {
            println!("FAILED    {p}");
        }
        println!(
            "{} pods restored, {} unchanged, {} PodAllocations deleted, {} failed",
            report.restored.len(),
            report.unchanged.len(),
            report.deleted,
            report.failed.len()
        );
    }
    Ok(if report.failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::{
        crd::{CpuQuantity, OriginalLimit, PodAllocationStatus},
        pods::ContainerFacts,
        publish::{Why, allocation_for},
    };

    fn pod(limit: u64) -> PodFacts {
        PodFacts::burstable(
            "u1",
            "shop",
            vec![ContainerFacts::limited("app", 100, limit)],
        )
    }

    #[test]
    fn originals_in_the_spec_alone_are_restored() {
        // The daemon wrote the allocation (originals 400m in its spec) and the
        // pod was resized to 900m before any status was written.
        let why = Why {
            demand: MilliCpu(900),
            weight: 100.0,
            price: 1.0,
            reason: "increase_throttled",
        };
        let pa = allocation_for(&pod(400), None, "n1", MilliCpu(900), &why);
        assert_eq!(
            restore_changes(&pa, &pod(900)),
            Ok(vec![("app".into(), MilliCpu(400))])
        );
        // The status's originals win where both exist.
        let mut pa = pa;
        pa.status = Some(PodAllocationStatus {
            original: vec![OriginalLimit {
                name: "app".into(),
                cpu_limit: Some(CpuQuantity(MilliCpu(300))),
            }],
            ..Default::default()
        });
        assert_eq!(
            restore_changes(&pa, &pod(900)),
            Ok(vec![("app".into(), MilliCpu(300))])
        );
        // Already at the originals: nothing to do.
        assert_eq!(restore_changes(&pa, &pod(300)), Ok(vec![]));
    }
}
