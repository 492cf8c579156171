//! Control-plane tier: the PodAllocation CRD, the resize controller, the
//! writer and `mbcas restore` against a real kube-apiserver (see
//! tests/common/apiserver.rs for where it comes from). No kubelet runs: pods
//! are bound to Node objects the tests create, and a test plays the kubelet
//! where it needs one (it writes `status.containerStatuses[].resources`).

mod common;

use std::time::Duration;

use common::{
    apiserver::{TestEnv, TestNamespace, TestNode, eventually},
    k8s::{
        Daemon, PodSpec, WAIT, allocation, cpu_limit, create_pod, free_addr, install_crd,
        kubelet_refuses, kubelet_reports, mbcas_event_reasons, phase_is, resizes_total,
        restore_node, write_allocation,
    },
};
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, ResourceExt as _,
    api::{Patch, PatchParams, PostParams},
};
use mbcas::{
    k8s::{
        crd::{CpuQuantity, NODE_LABEL, Phase, PodAllocation},
        pods::PodFacts,
        publish::{Why, Writer, allocation_for},
    },
    units::MilliCpu,
};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crd_is_served_and_rejects_nonsense() {
    let Some(env) = TestEnv::get() else { return };
    let client = env.client().await;
    install_crd(&client).await;
    let ns = TestNamespace::new(env, &client, "crd").await;
    let api: Api<kube::api::DynamicObject> = Api::namespaced_with(
        client.clone(),
        &ns.name,
        &kube::discovery::ApiResource::erase::<PodAllocation>(&()),
    );
    let obj = |v: &serde_json::Value| -> kube::api::DynamicObject {
        serde_json::from_value(v.clone()).unwrap()
    };
    let good = serde_json::json!({
        "apiVersion": "allocation.mbcas.io/v1alpha1", "kind": "PodAllocation",
        "metadata": {"name": "ok"},
        "spec": {"podName": "ok", "podUid": "u", "nodeName": "n", "cpuLimit": "500m",
                 "containers": [{"name": "app", "cpuLimit": "0.5"}], "demand": "1",
                 "weight": 0.25, "price": 0.0, "reason": "increase"}
    });
    api.create(&PostParams::default(), &obj(&good))
        .await
        .unwrap_or_else(|e| panic!("a valid PodAllocation was refused: {e}"));
    for (field, bad) in [
        ("cpuLimit", serde_json::json!("-500m")),
        ("cpuLimit", serde_json::json!("lots")),
        ("cpuLimit", serde_json::json!("1.23456")),
        ("weight", serde_json::json!(-1.0)),
        ("reason", serde_json::json!("Not A Code")),
        ("containers", serde_json::json!([])),
    ] {
        let mut v = good.clone();
        v["metadata"]["name"] = format!("bad-{}", field.to_lowercase()).into();
        v["spec"][field] = bad.clone();
        let res = api.create(&PostParams::default(), &obj(&v)).await;
        match res {
            Err(kube::Error::Api(s)) => assert_eq!(s.code, 422, "{field}={bad}: {s:?}"),
            other => panic!("{field}={bad} was not rejected: {other:?}"),
        }
    }
    // An unknown phase in the status is rejected by the status subresource.
    let status = serde_json::json!({"status": {"phase": "Exploded"}});
    let res = api
        .patch_status("ok", &PatchParams::default(), &Patch::Merge(&status))
        .await;
    assert!(
        matches!(&res, Err(kube::Error::Api(s)) if s.code == 422),
        "unknown phase accepted: {res:?}"
    );
    // kubectl's short name and columns come from the CRD.
    let out = env
        .kubectl()
        .args(["get", "pa", "-n", &ns.name])
        .output()
        .unwrap_or_else(|e| panic!("kubectl: {e}"));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for col in [
        "POD", "NODE", "DESIRED", "APPLIED", "DEMAND", "PHASE", "REASON", "AGE",
    ] {
        assert!(text.contains(col), "column {col} missing:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_resizes_burstable_pods_and_reports_applied() {
    let Some(env) = TestEnv::get() else { return };
    let client = env.client().await;
    install_crd(&client).await;
    let ns = TestNamespace::new(env, &client, "resize").await;
    let node = TestNode::new(env, &client, "resize", MilliCpu(4000)).await;
    let pod = create_pod(
        &client,
        &ns.name,
        &node.name,
        &PodSpec::burstable("web", "250m", "500m"),
    )
    .await;
    let low = create_pod(
        &client,
        &ns.name,
        &node.name,
        &PodSpec::burstable("low", "300m", "600m"),
    )
    .await;
    let metrics = free_addr();
    let daemon = Daemon::start(client.clone(), &node.name, &["--metrics-addr", &metrics]);
    write_allocation(&client, &pod, &node.name, MilliCpu(700)).await;
    // Below the request: the controller never goes under it.
    write_allocation(&client, &low, &node.name, MilliCpu(100)).await;

    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let pa = eventually(
        "web's PodAllocation to be Pending with the resize requested",
        WAIT,
        || async { phase_is(&client, &ns.name, "web", Phase::Pending).await },
    )
    .await;
    let st = pa.status.clone().unwrap_or_default();
    // Requested, and maybe already re-examined after the pod's spec changed.
    assert!(
        matches!(
            st.reason.as_deref(),
            Some("ResizeRequested" | "WaitingForKubelet")
        ),
        "{st:?}"
    );
    assert_eq!(st.original.len(), 1);
    assert_eq!(st.original[0].cpu_limit, Some(CpuQuantity(MilliCpu(500))));
    let web = eventually("web's limit to be raised", WAIT, || async {
        pods.get("web")
            .await
            .ok()
            .filter(|p| cpu_limit(p) == Some(MilliCpu(700)))
    })
    .await;
    // Requests untouched.
    assert_eq!(
        PodFacts::from_pod(&web).map(|f| f.request()),
        Ok(MilliCpu(250))
    );

    let low_pod = eventually("low's limit to go down to its request", WAIT, || async {
        pods.get("low")
            .await
            .ok()
            .filter(|p| cpu_limit(p) == Some(MilliCpu(300)))
    })
    .await;
    assert_eq!(cpu_limit(&low_pod), Some(MilliCpu(300)));

    // The kubelet reports the new limit: Applied.
    kubelet_reports(&client, &ns.name, "web").await;
    let pa = eventually("web's PodAllocation to be Applied", WAIT, || async {
        phase_is(&client, &ns.name, "web", Phase::Applied).await
    })
    .await;
    let st = pa.status.clone().unwrap_or_default();
    assert_eq!(st.applied_cpu_limit, Some(CpuQuantity(MilliCpu(700))));
    assert_eq!(st.observed_generation, pa.metadata.generation);
    // A resize that works is told by the kubelet (ResizeStarted/Completed):
    // MBCAS publishes no event of its own for it.
    let reasons = mbcas_event_reasons(&client, &ns.name, "web").await;
    assert!(reasons.is_empty(), "{reasons:?}");
    // A fixed point: no further writes to the allocation while nothing changes.
    let rv = pa.resource_version();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let again = allocation(&client, &ns.name, "web")
        .await
        .map(|p| p.resource_version());
    assert_eq!(
        again,
        Some(rv),
        "the controller keeps rewriting a settled allocation"
    );
    // A resize the kubelet refuses is a failure, on record and told.
    write_allocation(&client, &web, &node.name, MilliCpu(900)).await;
    eventually("web's limit to be raised again", WAIT, || async {
        pods.get("web")
            .await
            .ok()
            .filter(|p| cpu_limit(p) == Some(MilliCpu(900)))
    })
    .await;
    kubelet_refuses(&client, &ns.name, "web", "Node didn't have enough capacity").await;
    let pa = eventually("web's PodAllocation to be Failed", WAIT, || async {
        phase_is(&client, &ns.name, "web", Phase::Failed).await
    })
    .await;
    let st = pa.status.clone().unwrap_or_default();
    assert_eq!(st.reason.as_deref(), Some("Infeasible"), "{st:?}");
    let reasons = eventually("a ResizeFailed event", WAIT, || async {
        let r = mbcas_event_reasons(&client, &ns.name, "web").await;
        r.iter().any(|x| x == "ResizeFailed").then_some(r)
    })
    .await;
    assert_eq!(reasons, ["ResizeFailed"]);
    // The kubelet's verdict is counted once.
    assert_eq!(resizes_total(&metrics, "kubelet_infeasible"), 1.0);
    assert_eq!(
        resizes_total(&metrics, "applied"),
        1.0,
        "web (the kubelet never reports low)"
    );
    daemon.stop().await;
}

/// Deletes a pod the test made in kube-system (with its PodAllocation), also on panic.
struct KubeSystemPod {
    client: kube::Client,
    name: String,
}

impl Drop for KubeSystemPod {
    fn drop(&mut self) {
        let (client, name) = (self.client.clone(), self.name.clone());
        let handle = tokio::runtime::Handle::current();
        // Runs on a helper thread: drop may happen while the runtime unwinds.
        let _ = std::thread::spawn(move || {
            handle.block_on(async move {
                let dp = kube::api::DeleteParams::default().grace_period(0);
                let _ = Api::<PodAllocation>::namespaced(client.clone(), "kube-system")
                    .delete(&name, &dp)
                    .await;
                let _ = Api::<Pod>::namespaced(client, "kube-system")
                    .delete(&name, &dp)
                    .await;
            });
        })
        .join();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_mbcas_must_not_touch_are_skipped_and_untouched() {
    let Some(env) = TestEnv::get() else { return };
    let client = env.client().await;
    install_crd(&client).await;
    let ns = TestNamespace::new(env, &client, "skip").await;
    let node = TestNode::new(env, &client, "skip", MilliCpu(4000)).await;
    let guaranteed = PodSpec {
        memory_limit: true,
        ..PodSpec::burstable("guaranteed", "500m", "500m")
    };
    let restart = PodSpec {
        restart_policy: Some("RestartContainer"),
        ..PodSpec::burstable("restart", "250m", "500m")
    };
    let ignored = PodSpec {
        labels: serde_json::json!({"mbcas.io/ignore": "true"}),
        ..PodSpec::burstable("ignored", "250m", "500m")
    };
    // A CPU budget at pod level (KEP-2837, on by default since 1.34): the
    // API server keeps it, and MBCAS leaves the pod alone with its reason.
    let pod_level = PodSpec {
        pod_limit: Some("800m"),
        ..PodSpec::burstable("podlevel", "250m", "500m")
    };
    let mut pods = Vec::new();
    for spec in [&guaranteed, &restart, &ignored, &pod_level] {
        pods.push(create_pod(&client, &ns.name, &node.name, spec).await);
    }
    let kept = pods[3]
        .spec
        .as_ref()
        .and_then(|s| s.resources.as_ref())
        .and_then(|r| r.limits.as_ref())
        .and_then(|l| l.get("cpu"))
        .map(|q| q.0.clone());
    assert_eq!(
        kept.as_deref(),
        Some("800m"),
        "the API server dropped the pod-level limit"
    );
    // Excluded namespaces: kube-system itself (the default), and a test namespace
    // added with --excluded-namespaces. The kube-system pod is unique to this
    // run, bound to the test node, and deleted by a guard.
    let ns2 = TestNamespace::new(env, &client, "skipns").await;
    let sys = create_pod(
        &client,
        &ns2.name,
        &node.name,
        &PodSpec::burstable("sys", "250m", "500m"),
    )
    .await;
    let ks_name = common::apiserver::unique_name("ks");
    let kube_system = create_pod(
        &client,
        "kube-system",
        &node.name,
        &PodSpec::burstable(&ks_name, "250m", "500m"),
    )
    .await;
    let _ks_guard = KubeSystemPod {
        client: client.clone(),
        name: ks_name.clone(),
    };
    let excluded = format!("kube-system,{}", ns2.name);
    let daemon = Daemon::start(
        client.clone(),
        &node.name,
        &["--excluded-namespaces", &excluded],
    );
    for p in pods.iter().chain([&sys, &kube_system]) {
        write_allocation(&client, p, &node.name, MilliCpu(900)).await;
    }
    let ks_ns = "kube-system".to_owned();
    for (ns_name, name, reason) in [
        (&ns.name, "guaranteed", "Guaranteed"),
        (&ns.name, "restart", "RestartContainerPolicy"),
        (&ns.name, "ignored", "OptedOut"),
        (&ns.name, "podlevel", "PodLevelResources"),
        (&ns2.name, "sys", "ExcludedNamespace"),
        (&ks_ns, ks_name.as_str(), "ExcludedNamespace"),
    ] {
        let pa = eventually(&format!("{name} to be Skipped"), WAIT, || async {
            phase_is(&client, ns_name, name, Phase::Skipped).await
        })
        .await;
        assert_eq!(pa.status.and_then(|s| s.reason).as_deref(), Some(reason));
        let pod = Api::<Pod>::namespaced(client.clone(), ns_name)
            .get(name)
            .await
            .unwrap();
        assert_eq!(cpu_limit(&pod), Some(MilliCpu(500)), "{name} was resized");
    }
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allocation_for_a_missing_pod_fails_with_a_reason() {
    let Some(env) = TestEnv::get() else { return };
    let client = env.client().await;
    install_crd(&client).await;
    let ns = TestNamespace::new(env, &client, "ghost").await;
    let node = TestNode::new(env, &client, "ghost", MilliCpu(2000)).await;
    let pod = create_pod(
        &client,
        &ns.name,
        &node.name,
        &PodSpec::burstable("ghost", "100m", "200m"),
    )
    .await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    pods.delete("ghost", &kube::api::DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    eventually("the pod to be gone", WAIT, || async {
        pods.get_opt("ghost").await.ok().filter(Option::is_none)
    })
    .await;
    let daemon = Daemon::start(client.clone(), &node.name, &[]);
    // Written without an owner (the pod is gone, the garbage collector would
    // take it otherwise): the controller must say why nothing happens.
    let facts = PodFacts::from_pod(&pod).unwrap();
    let mut pa = allocation_for(
        &facts,
        None,
        &node.name,
        MilliCpu(400),
        &Why {
            demand: MilliCpu(400),
            weight: 100.0,
            price: 1.0,
            reason: "increase",
        },
    );
    pa.metadata.owner_references = None;
    Api::<PodAllocation>::namespaced(client.clone(), &ns.name)
        .patch(
            "ghost",
            &PatchParams::apply("mbcas-tests").force(),
            &Patch::Apply(&pa),
        )
        .await
        .unwrap();
    let pa = eventually("the allocation to be Failed", WAIT, || async {
        phase_is(&client, &ns.name, "ghost", Phase::Failed).await
    })
    .await;
    assert_eq!(
        pa.status.and_then(|s| s.reason).as_deref(),
        Some("PodNotFound")
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writer_creates_updates_and_collects_allocations() {
    let Some(env) = TestEnv::get() else { return };
    let client = env.client().await;
    install_crd(&client).await;
    let ns = TestNamespace::new(env, &client, "writer").await;
    let node = TestNode::new(env, &client, "writer", MilliCpu(4000)).await;
    let pod = create_pod(
        &client,
        &ns.name,
        &node.name,
        &PodSpec::burstable("w", "250m", "500m"),
    )
    .await;
    let gone = create_pod(
        &client,
        &ns.name,
        &node.name,
        &PodSpec::burstable("gone", "250m", "500m"),
    )
    .await;

    // The writer works from a store of this node's allocations.
    let (store, writer_handle) = kube::runtime::reflector::store::<PodAllocation>();
    let api_all: Api<PodAllocation> = Api::all(client.clone());
    let wc =
        kube::runtime::watcher::Config::default().labels(&format!("{NODE_LABEL}={}", node.name));
    let stop = CancellationToken::new();
    let s2 = stop.clone();
    let reflect = tokio::spawn(async move {
        use futures::StreamExt as _;
        use kube::runtime::WatchStreamExt as _;
        let stream = kube::runtime::watcher(api_all, wc)
            .default_backoff()
            .reflect(writer_handle);
        futures::pin_mut!(stream);
        loop {
            tokio::select! {
                () = s2.cancelled() => return,
                n = stream.next() => if n.is_none() { return },
            }
        }
    });
    store.wait_until_ready().await.unwrap();
    let writer = Writer::new(client.clone(), node.name.clone(), store.clone());
    let why = Why {
        demand: MilliCpu(600),
        weight: 250.0,
        price: 2.0,
        reason: "increase",
    };
    let facts = PodFacts::from_pod(&pod).unwrap();
    let pa = allocation_for(&facts, None, &node.name, MilliCpu(600), &why);
    assert_eq!(writer.publish(&pa).await.ok(), Some(true), "first write");
    let stored = eventually("the allocation in the store", WAIT, || async {
        writer.stored(&ns.name, "w")
    })
    .await;
    assert_eq!(stored.spec.cpu_limit, CpuQuantity(MilliCpu(600)));
    assert_eq!(stored.owner_references()[0].uid, facts.uid);
    // The same decision again: no write.
    assert_eq!(
        writer.publish(&pa).await.ok(),
        Some(false),
        "unchanged allocation rewritten"
    );
    // A new decision: updated in place.
    let pa2 = allocation_for(&facts, None, &node.name, MilliCpu(800), &why);
    assert_eq!(writer.publish(&pa2).await.ok(), Some(true));
    eventually("the update", WAIT, || async {
        allocation(&client, &ns.name, "w")
            .await
            .filter(|p| p.spec.cpu_limit == CpuQuantity(MilliCpu(800)))
    })
    .await;
    // Garbage: an allocation whose pod is deleted goes.
    let gone_facts = PodFacts::from_pod(&gone).unwrap();
    writer
        .publish(&allocation_for(
            &gone_facts,
            None,
            &node.name,
            MilliCpu(600),
            &why,
        ))
        .await
        .unwrap();
    eventually("gone's allocation in the store", WAIT, || async {
        writer.stored(&ns.name, "gone")
    })
    .await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    pods.delete("gone", &kube::api::DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    // The node's pod store, as the daemon keeps it.
    let (pod_store, pod_writer) = kube::runtime::reflector::store::<Pod>();
    let pod_api: Api<Pod> = Api::all(client.clone());
    let s3 = stop.clone();
    let node_name = node.name.clone();
    let reflect_pods = tokio::spawn(async move {
        use futures::StreamExt as _;
        use kube::runtime::WatchStreamExt as _;
        let stream =
            kube::runtime::watcher(pod_api, mbcas::k8s::pods::node_pods_config(&node_name))
                .default_backoff()
                .reflect(pod_writer);
        futures::pin_mut!(stream);
        loop {
            tokio::select! {
                () = s3.cancelled() => return,
                n = stream.next() => if n.is_none() { return },
            }
        }
    });
    pod_store.wait_until_ready().await.unwrap();
    eventually("the deleted pod to leave the store", WAIT, || async {
        pod_store
            .get(&kube::runtime::reflector::ObjectRef::new("gone").within(&ns.name))
            .is_none()
            .then_some(())
    })
    .await;
    let deleted = writer.collect_garbage(&pod_store).await.unwrap();
    // The garbage collector of kube-controller-manager may have been faster (ownerReference).
    assert!(deleted <= 1);
    eventually("gone's allocation to be deleted", WAIT, || async {
        allocation(&client, &ns.name, "gone")
            .await
            .is_none()
            .then_some(())
    })
    .await;
    assert!(
        allocation(&client, &ns.name, "w").await.is_some(),
        "a live pod's allocation was deleted"
    );
    stop.cancel();
    let _ = reflect.await;
    let _ = reflect_pods.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_puts_original_limits_back_and_removes_allocations() {
    let Some(env) = TestEnv::get() else { return };
    let client = env.client().await;
    install_crd(&client).await;
    let ns = TestNamespace::new(env, &client, "restore").await;
    let node = TestNode::new(env, &client, "restore", MilliCpu(4000)).await;
    let pod = create_pod(
        &client,
        &ns.name,
        &node.name,
        &PodSpec::burstable("r", "200m", "400m"),
    )
    .await;
    let daemon = Daemon::start(client.clone(), &node.name, &[]);
    write_allocation(&client, &pod, &node.name, MilliCpu(600)).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    eventually("the resize", WAIT, || async {
        pods.get("r")
            .await
            .ok()
            .filter(|p| cpu_limit(p) == Some(MilliCpu(600)))
    })
    .await;
    daemon.stop().await;
    let report = restore_node(&client, &node.name).await;
    assert_eq!(
        report.restored,
        vec![format!("{}/r", ns.name)],
        "{report:?}"
    );
    assert!(report.failed.is_empty(), "{report:?}");
    assert_eq!(report.deleted, 1);
    let p = pods.get("r").await.unwrap();
    assert_eq!(cpu_limit(&p), Some(MilliCpu(400)));
    assert!(allocation(&client, &ns.name, "r").await.is_none());
}

/// `mbcas restore --stop-daemonset` (the Helm chart's pre-delete hook): the
/// DaemonSet is deleted in the foreground and the command waits until it and
/// the pods its selector matches are gone; a pod that stays is named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_stops_the_daemonset_and_waits_for_its_pods() {
    use k8s_openapi::api::apps::v1::DaemonSet;
    use mbcas::k8s::restore::{RestoreError, stop_daemonset};
    let Some(env) = TestEnv::get() else { return };
    let client = env.client().await;
    let ns = TestNamespace::new(env, &client, "stopds").await;
    let sets: Api<DaemonSet> = Api::namespaced(client.clone(), &ns.name);
    let labels = serde_json::json!({"app.kubernetes.io/name": "stopped"});
    let set: DaemonSet = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "daemon"},
        "spec": {
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                // No node carries this label: the DaemonSet runs no pod.
                "spec": {"nodeSelector": {"mbcas.io/no-such-node": "true"},
                         "containers": [{"name": "c", "image": "mbcas:dev"}]}
            }
        }
    }))
    .unwrap();
    sets.create(&PostParams::default(), &set).await.unwrap();
    let wait = Duration::from_secs(30);
    assert!(
        stop_daemonset(&client, &ns.name, "daemon", wait)
            .await
            .unwrap(),
        "an existing DaemonSet was not reported as stopped"
    );
    assert!(sets.get_opt("daemon").await.unwrap().is_none());
    assert!(
        !stop_daemonset(&client, &ns.name, "daemon", wait)
            .await
            .unwrap(),
        "a missing DaemonSet was reported as stopped"
    );
    // A pod its selector matches that does not go: the wait ends with an
    // error naming it. Another controller owns it, so the DaemonSet controller
    // does not adopt it and the garbage collector leaves it alone.
    sets.create(&PostParams::default(), &set).await.unwrap();
    let maps: Api<k8s_openapi::api::core::v1::ConfigMap> =
        Api::namespaced(client.clone(), &ns.name);
    let owner = maps
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({"metadata": {"name": "owner"}})).unwrap(),
        )
        .await
        .unwrap();
    let stray: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "stray", "labels": labels, "ownerReferences": [{
            "apiVersion": "v1", "kind": "ConfigMap", "name": "owner",
            "uid": owner.metadata.uid, "controller": true}]},
        "spec": {"containers": [{"name": "c", "image": "mbcas:dev"}]}
    }))
    .unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    pods.create(&PostParams::default(), &stray).await.unwrap();
    match stop_daemonset(&client, &ns.name, "daemon", Duration::from_secs(3)).await {
        Err(e @ RestoreError::DaemonSetNotGone { .. }) => {
            assert!(e.to_string().contains("stray"), "{e}");
        }
        other => panic!("expected the stray pod to be named, got {other:?}"),
    }
}

/// The node's holder of the lease, if any.
async fn lease_holder(client: &kube::Client, node: &str) -> Option<String> {
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(client.clone(), "default");
    leases
        .get_opt(&mbcas::k8s::lease::lease_name(node))
        .await
        .ok()
        .flatten()
        .and_then(|l| l.spec?.holder_identity)
}

/// One daemon per node acts. A daemon that finds the node's lease held waits:
/// it writes nothing, even with an allocation to apply; it takes the lease
/// when its holder stops renewing it (a crash) and then acts; a clean stop
/// releases it at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_daemon_per_node_acts_and_a_second_takes_over() {
    use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
    let Some(env) = TestEnv::get() else { return };
    let client = env.client().await;
    install_crd(&client).await;
    let ns = TestNamespace::new(env, &client, "lease").await;
    let node = TestNode::new(env, &client, "lease", MilliCpu(4000)).await;
    let pod = create_pod(
        &client,
        &ns.name,
        &node.name,
        &PodSpec::burstable("web", "250m", "500m"),
    )
    .await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);

    // Another copy holds the lease (3 s) and renews it every second.
    let leases: Api<Lease> = Api::namespaced(client.clone(), "default");
    let name = mbcas::k8s::lease::lease_name(&node.name);
    let renew = |leases: Api<Lease>, name: String| async move {
        let mut l = leases
            .get_opt(&name)
            .await
            .ok()
            .flatten()
            .unwrap_or_default();
        l.metadata.name = Some(name.clone());
        l.spec = Some(LeaseSpec {
            holder_identity: Some("other-copy".to_owned()),
            lease_duration_seconds: Some(3),
            renew_time: Some(MicroTime(k8s_openapi::jiff::Timestamp::now())),
            ..LeaseSpec::default()
        });
        if l.metadata.resource_version.is_some() {
            leases
                .replace(&name, &PostParams::default(), &l)
                .await
                .map(drop)
        } else {
            leases.create(&PostParams::default(), &l).await.map(drop)
        }
    };
    renew(leases.clone(), name.clone())
        .await
        .unwrap_or_else(|e| panic!("create the other copy's lease: {e}"));
    let other = CancellationToken::new();
    let renewing = {
        let (o, l, n) = (other.clone(), leases.clone(), name.clone());
        tokio::spawn(async move {
            while !o.is_cancelled() {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let _ = renew(l.clone(), n.clone()).await;
            }
        })
    };

    let first = Daemon::start(
        client.clone(),
        &node.name,
        &["--lease-duration", "3s", "--lease-identity", "first"],
    );
    write_allocation(&client, &pod, &node.name, MilliCpu(700)).await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert!(first.is_running(), "a waiting daemon keeps running");
    assert_eq!(
        cpu_limit(&pods.get("web").await.unwrap()),
        Some(MilliCpu(500)),
        "a daemon without the lease resized a pod"
    );
    assert_eq!(
        allocation(&client, &ns.name, "web")
            .await
            .and_then(|pa| pa.status),
        None,
        "a daemon without the lease wrote a PodAllocation's status"
    );
    assert_eq!(
        lease_holder(&client, &node.name).await.as_deref(),
        Some("other-copy")
    );

    // The other copy dies: the lease expires (3 s unchanged) and the waiting
    // daemon takes it and acts.
    other.cancel();
    let _ = renewing.await;
    let t = std::time::Instant::now();
    eventually("the waiting daemon to take the lease", WAIT, || async {
        (lease_holder(&client, &node.name).await.as_deref() == Some("first")).then_some(())
    })
    .await;
    let took = t.elapsed();
    assert!(
        took <= Duration::from_secs(6),
        "took over {took:?} after the holder stopped (lease 3 s, polled every 0.75 s)"
    );
    eventually("the pod to be resized by the new holder", WAIT, || async {
        pods.get("web")
            .await
            .ok()
            .filter(|p| cpu_limit(p) == Some(MilliCpu(700)))
    })
    .await;

    // A second daemon waits while the first renews.
    let second = Daemon::start(
        client.clone(),
        &node.name,
        &["--lease-duration", "3s", "--lease-identity", "second"],
    );
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        lease_holder(&client, &node.name).await.as_deref(),
        Some("first")
    );
    // The first crashes (nothing released): the second takes over.
    first.kill().await;
    eventually("the second daemon to take the lease", WAIT, || async {
        (lease_holder(&client, &node.name).await.as_deref() == Some("second")).then_some(())
    })
    .await;
    // A clean stop releases it at once.
    second.stop().await;
    assert_eq!(
        lease_holder(&client, &node.name).await,
        None,
        "released on stop"
    );
}

/// A resize never changes a pod's QoS class: a Burstable pod whose memory
/// limit equals its request would become Guaranteed at limit = request (the
/// API server refuses that resize); MBCAS keeps it 10 m above its request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resize_never_makes_a_burstable_pod_guaranteed() {
    let Some(env) = TestEnv::get() else { return };
    let client = env.client().await;
    install_crd(&client).await;
    let ns = TestNamespace::new(env, &client, "qos").await;
    let node = TestNode::new(env, &client, "qos", MilliCpu(4000)).await;
    let spec = PodSpec {
        memory_limit: true,
        ..PodSpec::burstable("pinned", "250m", "500m")
    };
    let pod = create_pod(&client, &ns.name, &node.name, &spec).await;
    assert_eq!(
        pod.status.as_ref().and_then(|s| s.qos_class.as_deref()),
        Some("Burstable")
    );
    let daemon = Daemon::start(client.clone(), &node.name, &[]);
    // An idle pod: the decision is its request.
    write_allocation(&client, &pod, &node.name, MilliCpu(250)).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let resized = eventually("pinned resized just above its request", WAIT, || async {
        pods.get("pinned")
            .await
            .ok()
            .filter(|p| cpu_limit(p) == Some(MilliCpu(260)))
    })
    .await;
    assert_eq!(
        resized.status.as_ref().and_then(|s| s.qos_class.as_deref()),
        Some("Burstable")
    );
    kubelet_reports(&client, &ns.name, "pinned").await;
    let pa = eventually("pinned's PodAllocation Applied", WAIT, || async {
        phase_is(&client, &ns.name, "pinned", Phase::Applied).await
    })
    .await;
    let st = pa.status.unwrap_or_default();
    assert_eq!(st.applied.len(), 1, "{st:?}");
    assert_eq!(
        st.applied[0].cpu_limit,
        CpuQuantity(MilliCpu(260)),
        "{st:?}"
    );
    daemon.stop().await;
}

/// Someone else resizes a managed pod (as `kubectl patch --subresource
/// resize` does): MBCAS adopts their limit as the original, says so (status,
/// Event), leaves the pod alone though its allocation asks otherwise, keeps
/// doing so across a restart, acts again once the hold is over, and `mbcas
/// restore` returns the operator's limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operators_resize_is_adopted_and_left_alone() {
    let Some(env) = TestEnv::get() else { return };
    let client = env.client().await;
    install_crd(&client).await;
    let ns = TestNamespace::new(env, &client, "operator").await;
    let node = TestNode::new(env, &client, "operator", MilliCpu(4000)).await;
    let pod = create_pod(
        &client,
        &ns.name,
        &node.name,
        &PodSpec::burstable("web", "250m", "500m"),
    )
    .await;
    let container = pod.spec.as_ref().unwrap().containers[0].name.clone();
    const HOLD: &str = "25s";
    let daemon = Daemon::start(client.clone(), &node.name, &["--operator-hold", HOLD]);
    write_allocation(&client, &pod, &node.name, MilliCpu(700)).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let resized = eventually("web resized to 700m", WAIT, || async {
        pods.get("web")
            .await
            .ok()
            .filter(|p| cpu_limit(p) == Some(MilliCpu(700)))
    })
    .await;
    // MBCAS's resizes carry its field manager (what tells them from others').
    let managers: Vec<(String, Option<String>)> = resized
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .map(|e| (e.manager.clone().unwrap_or_default(), e.subresource.clone()))
        .collect();
    assert!(
        managers.contains(&("mbcas-daemon".to_owned(), Some("resize".to_owned()))),
        "{managers:?}"
    );
    kubelet_reports(&client, &ns.name, "web").await;
    eventually("web's PodAllocation Applied", WAIT, || async {
        phase_is(&client, &ns.name, "web", Phase::Applied).await
    })
    .await;
    // The operator lowers it to 300m.
    let patch = serde_json::json!({"spec": {"containers": [
        {"name": container, "resources": {"limits": {"cpu": "300m"}}}
    ]}});
    pods.patch_resize(
        "web",
        &PatchParams {
            field_manager: Some("kubectl-patch".to_owned()),
            ..PatchParams::default()
        },
        &Patch::Strategic(&patch),
    )
    .await
    .unwrap();
    let adopted = eventually("the operator's change adopted", WAIT, || async {
        allocation(&client, &ns.name, "web").await.filter(|pa| {
            pa.status
                .as_ref()
                .is_some_and(|s| s.reason.as_deref() == Some("OperatorChange"))
        })
    })
    .await;
    let st = adopted.status.unwrap_or_default();
    assert_eq!(st.phase, Phase::Skipped, "{st:?}");
    assert_eq!(st.original.len(), 1, "{st:?}");
    assert_eq!(
        st.original[0].cpu_limit,
        Some(CpuQuantity(MilliCpu(300))),
        "the operator's limit is the original: {st:?}"
    );
    let change = st
        .operator_change
        .clone()
        .expect("operatorChange on record");
    assert_eq!(change.manager, "kubectl-patch");
    assert!(change.hold_until.0 > change.changed_at.0, "{change:?}");
    // A new decision is not applied while the hold lasts, nor after a restart.
    write_allocation(
        &client,
        &pods.get("web").await.unwrap(),
        &node.name,
        MilliCpu(900),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    daemon.stop().await;
    let daemon = Daemon::start(client.clone(), &node.name, &["--operator-hold", HOLD]);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let now = pods.get("web").await.unwrap();
    assert_eq!(
        cpu_limit(&now),
        Some(MilliCpu(300)),
        "the operator's limit was overridden"
    );
    let reasons = mbcas_event_reasons(&client, &ns.name, "web").await;
    assert_eq!(
        reasons
            .iter()
            .filter(|r| *r == "OperatorChangeAdopted")
            .count(),
        1,
        "one Event for one change: {reasons:?}"
    );
    let st = allocation(&client, &ns.name, "web")
        .await
        .and_then(|pa| pa.status)
        .unwrap_or_default();
    assert_eq!(st.reason.as_deref(), Some("OperatorChange"), "{st:?}");
    assert_eq!(st.operator_change, Some(change), "{st:?}");
    // The hold over, MBCAS acts again; the operator's limit stays the original.
    eventually("web resized to 900m after the hold", WAIT, || async {
        pods.get("web")
            .await
            .ok()
            .filter(|p| cpu_limit(p) == Some(MilliCpu(900)))
    })
    .await;
    daemon.stop().await;
    let report = restore_node(&client, &node.name).await;
    assert!(report.failed.is_empty(), "{report:?}");
    let p = pods.get("web").await.unwrap();
    assert_eq!(
        cpu_limit(&p),
        Some(MilliCpu(300)),
        "restore returns the operator's limit"
    );
}
