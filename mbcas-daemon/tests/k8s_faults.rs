//! Control-plane tier, fault injection: the real daemon (`mbcas run --mode
//! kubernetes --decide off`, in-process) against a real API server that goes
//! away, a daemon that restarts, and a shutdown in the middle of a resize.
//!
//! The outage test kills the kube-apiserver of a control plane of its own
//! (`PrivateEnv`: own etcd, ports and state directory), never the shared one
//! the other tests use. The restart and shutdown tests use the shared one.

mod common;

use std::time::{Duration, Instant};

use common::{
    apiserver::{PrivateEnv, TestEnv, TestNamespace, TestNode, eventually},
    k8s::{
        Daemon, PodSpec, allocation, cpu_limit, create_pod, install_crd, kubelet_reports, phase_is,
        write_allocation,
    },
};
use k8s_openapi::api::core::v1::Pod;
use kube::{Api, Client, ResourceExt as _, api::ListParams};
use mbcas::{
    k8s::crd::{CpuQuantity, Phase, PodAllocation},
    units::MilliCpu,
};

/// Generous: watchers back off while the API server is away.
const CONVERGE: Duration = Duration::from_secs(90);

async fn limit_becomes(pods: &Api<Pod>, name: &str, want: MilliCpu) -> Pod {
    eventually(
        &format!("{name}'s CPU limit to become {} m", want.get()),
        CONVERGE,
        || async {
            pods.get(name)
                .await
                .ok()
                .filter(|p| cpu_limit(p) == Some(want))
        },
    )
    .await
}

/// Waits until the kubelet (played by the test) reports `want` and the
/// allocation says Applied with that limit.
async fn applied(client: &Client, ns: &str, name: &str, want: MilliCpu) -> PodAllocation {
    kubelet_reports(client, ns, name).await;
    // The status keeps the last Applied limit while the kubelet is given its
    // grace for a new one: wait for the limit too, not only the phase.
    let pa = eventually(
        &format!("{name}'s PodAllocation to be Applied at {} m", want.get()),
        CONVERGE,
        || async {
            phase_is(client, ns, name, Phase::Applied)
                .await
                .filter(|pa| {
                    pa.status.as_ref().and_then(|s| s.applied_cpu_limit) == Some(CpuQuantity(want))
                })
        },
    )
    .await;
    let st = pa.status.clone().unwrap_or_default();
    assert_eq!(st.applied_cpu_limit, Some(CpuQuantity(want)), "{st:?}");
    pa
}

/// What a restart or an outage must not change: every pod's and every
/// allocation's resourceVersion, and the pods' CPU limits.
async fn snapshot(client: &Client, ns: &str) -> Vec<(String, String, Option<MilliCpu>)> {
    let pods = Api::<Pod>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
        .unwrap_or_else(|e| panic!("list pods: {e}"));
    let pas = Api::<PodAllocation>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
        .unwrap_or_else(|e| panic!("list PodAllocations: {e}"));
    let mut out: Vec<_> = pods
        .items
        .iter()
        .map(|p| {
            (
                format!("pod/{}", p.name_any()),
                p.resource_version().unwrap_or_default(),
                cpu_limit(p),
            )
        })
        .chain(pas.items.iter().map(|a| {
            (
                format!("podallocation/{}", a.name_any()),
                a.resource_version().unwrap_or_default(),
                None,
            )
        }))
        .collect();
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_server_outage_changes_nothing_and_the_daemon_converges_after() {
    let Some(private) = PrivateEnv::start("faults") else {
        return;
    };
    let env = &private.env;
    let client = env.client().await;
    install_crd(&client).await;
    let ns = TestNamespace::new(env, &client, "outage").await;
    let node = TestNode::new(env, &client, "outage", MilliCpu(4000)).await;
    let pod = create_pod(
        &client,
        &ns.name,
        &node.name,
        &PodSpec::burstable("web", "250m", "500m"),
    )
    .await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let daemon = Daemon::start(client.clone(), &node.name, &[]);
    write_allocation(&client, &pod, &node.name, MilliCpu(700)).await;
    limit_becomes(&pods, "web", MilliCpu(700)).await;
    applied(&client, &ns.name, "web", MilliCpu(700)).await;
    let before = snapshot(&client, &ns.name).await;

    private.kill_apiserver();
    // Long enough for every watcher to fail and back off more than once.
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert!(
        daemon.is_running(),
        "the daemon exited while the API server was down"
    );
    private.restart_apiserver();
    // Give the daemon time to re-list and reconcile what it finds.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        snapshot(&client, &ns.name).await,
        before,
        "the outage alone changed pods or allocations"
    );
    assert!(daemon.is_running(), "the daemon exited after the outage");

    // Converges: an allocation written after the restart is carried out.
    let pod = pods
        .get("web")
        .await
        .unwrap_or_else(|e| panic!("get web: {e}"));
    write_allocation(&client, &pod, &node.name, MilliCpu(900)).await;
    limit_becomes(&pods, "web", MilliCpu(900)).await;
    applied(&client, &ns.name, "web", MilliCpu(900)).await;
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_restart_alone_changes_nothing() {
    let Some(env) = TestEnv::get() else { return };
    let client = env.client().await;
    install_crd(&client).await;
    let ns = TestNamespace::new(env, &client, "restart").await;
    let node = TestNode::new(env, &client, "restart", MilliCpu(4000)).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let daemon = Daemon::start(client.clone(), &node.name, &[]);
    for (name, request, limit, desired) in
        [("web", "250m", "500m", 700), ("api", "200m", "400m", 300)]
    {
        let pod = create_pod(
            &client,
            &ns.name,
            &node.name,
            &PodSpec::burstable(name, request, limit),
        )
        .await;
        write_allocation(&client, &pod, &node.name, MilliCpu(desired)).await;
        limit_becomes(&pods, name, MilliCpu(desired)).await;
        applied(&client, &ns.name, name, MilliCpu(desired)).await;
    }
    let before = snapshot(&client, &ns.name).await;
    assert_eq!(
        before
            .iter()
            .filter(|(k, ..)| k.starts_with("podallocation/"))
            .count(),
        2,
        "{before:?}"
    );
    daemon.stop().await;

    let daemon = Daemon::start(client.clone(), &node.name, &[]);
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(daemon.is_running(), "the restarted daemon exited");
    assert_eq!(
        snapshot(&client, &ns.name).await,
        before,
        "restarting the daemon changed pods or allocations (duplicates, losses or rewrites)"
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_during_a_resize_drains_in_time_and_leaves_a_consistent_state() {
    const GRACE: Duration = Duration::from_secs(2);
    let Some(env) = TestEnv::get() else { return };
    let client = env.client().await;
    install_crd(&client).await;
    let ns = TestNamespace::new(env, &client, "shutdown").await;
    let node = TestNode::new(env, &client, "shutdown", MilliCpu(4000)).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    // Cancel at different points: before the controller saw the allocation,
    // about while it patches the pod, after.
    for (i, delay_ms) in [0_u64, 40, 250].into_iter().enumerate() {
        let name = format!("web{i}");
        let pod = create_pod(
            &client,
            &ns.name,
            &node.name,
            &PodSpec::burstable(&name, "250m", "500m"),
        )
        .await;
        let daemon = Daemon::start(client.clone(), &node.name, &["--grace-period", "2s"]);
        write_allocation(&client, &pod, &node.name, MilliCpu(700)).await;
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        let t0 = Instant::now();
        daemon.stop().await;
        let took = t0.elapsed();
        eprintln!("{name}: cancelled after {delay_ms} ms, drained in {took:?}");
        // The grace period bounds the drain; the margin absorbs a loaded machine.
        assert!(
            took < GRACE + Duration::from_secs(5),
            "{name}: shutdown took {took:?} with --grace-period {GRACE:?}"
        );

        let now = pods
            .get(&name)
            .await
            .unwrap_or_else(|e| panic!("get {name}: {e}"));
        let limit = cpu_limit(&now);
        let st = allocation(&client, &ns.name, &name)
            .await
            .and_then(|pa| pa.status);
        eprintln!("{name}: limit {limit:?}, allocation status {st:?}");
        match limit {
            Some(MilliCpu(500)) => assert!(
                st.as_ref().is_none_or(|s| s.phase != Phase::Applied
                    && s.applied_cpu_limit != Some(CpuQuantity(MilliCpu(700)))),
                "{name}: untouched pod but the allocation claims it applied: {st:?}"
            ),
            Some(MilliCpu(700)) => assert!(
                st.as_ref().is_none_or(|s| s.phase != Phase::Failed),
                "{name}: resized pod but the allocation says Failed: {st:?}"
            ),
            other => panic!("{name}: limit is neither untouched nor resized: {other:?}"),
        }

        // The next daemon finishes the job from whatever state was left.
        let daemon = Daemon::start(client.clone(), &node.name, &[]);
        limit_becomes(&pods, &name, MilliCpu(700)).await;
        applied(&client, &ns.name, &name, MilliCpu(700)).await;
        daemon.stop().await;
    }
}
