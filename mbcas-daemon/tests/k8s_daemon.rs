//! Kernel + control-plane tiers together: the whole daemon (`mbcas run --mode
//! kubernetes`, deciding) against the real API server with the real kernel
//! sensor. Pods bound to a test Node have no cgroups of their own, so each is
//! mapped (`--test-pod-cgroups`) onto a cgroup the test creates with real
//! burners, and the test plays the kubelet: it writes the pod's CPU limit into
//! that cgroup's quota and reports it in the pod's status.
// Test helpers: an unwrap that fails is the test failing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{collections::BTreeMap, time::Duration};

use common::{
    TestCgroup,
    apiserver::{TestEnv, TestNamespace, TestNode, eventually},
    k8s::{Daemon, PodSpec, allocation, cpu_limit, create_pod, install_crd, kubelet_reports},
    kernel_tier_available,
};
use k8s_openapi::api::core::v1::Pod;
use kube::{Api, Client};
use mbcas::{k8s::crd::Phase, units::MilliCpu};
use tokio_util::sync::CancellationToken;

/// The stand-in kubelet: the pod's spec limit becomes the cgroup's quota and
/// is reported back in the pod's status.
async fn kubelet(
    client: Client,
    ns: String,
    pods: Vec<(String, std::path::PathBuf, bool)>,
    stop: CancellationToken,
) {
    let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let mut applied: BTreeMap<String, MilliCpu> = BTreeMap::new();
    loop {
        for (name, dir, v2) in &pods {
            let Ok(pod) = api.get(name).await else {
                continue;
            };
            let Some(limit) = cpu_limit(&pod) else {
                continue;
            };
            if applied.get(name) == Some(&limit) {
                continue;
            }
            let (file, value) = if *v2 {
                ("cpu.max", format!("{} 100000", limit.get() * 100))
            } else {
                ("cpu.cfs_quota_us", (limit.get() * 100).to_string())
            };
            if std::fs::write(dir.join(file), value).is_ok() {
                kubelet_reports(&client, &ns, name).await;
                applied.insert(name.clone(), limit);
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(Duration::from_millis(300)) => {}
        }
    }
}

fn throttled_ratio(before: (u64, u64, u64), after: (u64, u64, u64)) -> f64 {
    let periods = after.0.saturating_sub(before.0).max(1);
    after.1.saturating_sub(before.1) as f64 / periods as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_follows_real_demand_through_pod_allocations_and_resizes() {
    if !kernel_tier_available() {
        return;
    }
    let Some(env) = TestEnv::get() else { return };
    let admin = env.client().await;
    install_crd(&admin).await;
    let ns = TestNamespace::new(env, &admin, "daemon").await;
    let node = TestNode::new(env, &admin, "daemon", MilliCpu(2000)).await;

    // hot: one burner at 100 % of a core, limited to 300m. idle: no load.
    let mut hot = TestCgroup::new("k8s-hot");
    hot.set_limit(Some(300));
    hot.spin();
    let idle = TestCgroup::new("k8s-idle");
    idle.set_limit(Some(500));
    create_pod(
        &admin,
        &ns.name,
        &node.name,
        &PodSpec::burstable("hot", "200m", "300m"),
    )
    .await;
    create_pod(
        &admin,
        &ns.name,
        &node.name,
        &PodSpec::burstable("idle", "100m", "500m"),
    )
    .await;
    for name in ["hot", "idle"] {
        kubelet_reports(&admin, &ns.name, name).await;
    }
    let map = serde_json::json!({
        format!("{}/hot", ns.name): hot.path,
        format!("{}/idle", ns.name): idle.path,
    });
    let dir = tempfile::tempdir().unwrap();
    let map_file = dir.path().join("pod-cgroups.json");
    std::fs::write(&map_file, map.to_string()).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap();
    let metrics_addr = format!("127.0.0.1:{port}");

    let stop_kubelet = CancellationToken::new();
    let kubelet_task = tokio::spawn(kubelet(
        admin.clone(),
        ns.name.clone(),
        vec![
            ("hot".into(), hot.path.clone(), hot.v2),
            ("idle".into(), idle.path.clone(), idle.v2),
        ],
        stop_kubelet.clone(),
    ));
    let before = hot.cpu_stat();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let at_start = hot.cpu_stat();
    let ratio_start = throttled_ratio(before, at_start);

    let map_arg = map_file.display().to_string();
    let daemon = Daemon::start(
        admin.clone(),
        &node.name,
        &[
            "--decide",
            "on",
            "--test-pod-cgroups",
            &map_arg,
            "--tick",
            "500ms",
            "--warmup-samples",
            "2",
            "--metrics-addr",
            &metrics_addr,
        ],
    );
    // The daemon raises hot's limit through a PodAllocation and pods/resize.
    let pods: Api<Pod> = Api::namespaced(admin.clone(), &ns.name);
    let raised = eventually(
        "hot's limit to be raised by MBCAS",
        Duration::from_secs(60),
        || async {
            pods.get("hot")
                .await
                .ok()
                .and_then(|p| cpu_limit(&p))
                .filter(|l| *l >= MilliCpu(600))
        },
    )
    .await;
    let pa = eventually(
        "hot's PodAllocation Applied",
        Duration::from_secs(30),
        || async {
            allocation(&admin, &ns.name, "hot").await.filter(|pa| {
                pa.status
                    .as_ref()
                    .is_some_and(|s| s.phase == Phase::Applied)
            })
        },
    )
    .await;
    assert!(
        ["increase", "increase_throttled", "max_step_up"].contains(&pa.spec.reason.as_str()),
        "{:?}",
        pa.spec
    );
    assert!(
        pa.spec.demand.millis() > MilliCpu(300),
        "demand {:?}",
        pa.spec.demand
    );
    let st = pa.status.unwrap_or_default();
    assert_eq!(
        st.original[0].cpu_limit.map(|q| q.millis()),
        Some(MilliCpu(300))
    );

    // Throttling of the hot cgroup fell once the new limit was in its quota.
    let mid = hot.cpu_stat();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let end = hot.cpu_stat();
    let ratio_end = throttled_ratio(mid, end);
    eprintln!(
        "hot: limit 300m → {raised}; throttled-period ratio {ratio_start:.2} → {ratio_end:.2}"
    );
    // A burner wanting a whole core in a 300m quota is throttled in most periods
    // (not all: the machine is shared with other work).
    assert!(
        ratio_start > 0.5,
        "the burner was not throttled at 300m: {ratio_start}"
    );
    assert!(
        ratio_end < ratio_start,
        "throttling did not fall: {ratio_start} → {ratio_end}"
    );

    // The idle pod stays within its request and the node (spare capacity may
    // be lent to it: limits are ceilings, at least its weighted share).
    let idle_pod = pods.get("idle").await.unwrap();
    let idle_limit = cpu_limit(&idle_pod);
    assert!(
        idle_limit.is_some_and(|l| l >= MilliCpu(100) && l <= MilliCpu(2000)),
        "{idle_limit:?}"
    );

    // /metrics shows the pods and /readyz is ready.
    let body = reqwest_get(&format!("http://{metrics_addr}/metrics")).await;
    assert!(body.contains("pod=\"hot\""), "no series for hot:\n{body}");
    let ready = reqwest_get(&format!("http://{metrics_addr}/readyz")).await;
    assert!(
        ready.starts_with("HTTP/1.0 200") || ready.starts_with("HTTP/1.1 200"),
        "{ready}"
    );

    daemon.stop().await;
    stop_kubelet.cancel();
    let _ = kubelet_task.await;
}

/// A minimal HTTP GET over a TCP stream (the tests need no HTTP client crate).
async fn reqwest_get(url: &str) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let rest = url.strip_prefix("http://").unwrap_or(url);
    let (host, path) = rest
        .split_once('/')
        .map_or((rest, "/".to_owned()), |(h, p)| (h, format!("/{p}")));
    let mut s = tokio::net::TcpStream::connect(host)
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"));
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}
