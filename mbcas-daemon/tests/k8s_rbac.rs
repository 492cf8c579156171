//! Control-plane tier, RBAC: the daemon run as the ServiceAccount of
//! `deploy/rbac.yaml` (impersonated) does its whole job — discovery, watches,
//! PodAllocation writes and garbage collection, `pods/resize`, status, events —
//! and is denied what it must never do.

mod common;

use common::{
    apiserver::{TestEnv, TestNamespace, TestNode, eventually},
    k8s::{
        Daemon, PodSpec, WAIT, allocation, cpu_limit, create_pod, install_crd, kubelet_refuses,
        kubelet_reports, mbcas_event_reasons, phase_is,
    },
};
use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{ConfigMap, Pod, Secret},
};
use kube::{
    Api, Client,
    api::{ListParams, Patch, PatchParams, PostParams},
};
use mbcas::{
    k8s::{
        crd::{Phase, PodAllocation},
        pods::PodFacts,
        publish::{Why, Writer, allocation_for},
    },
    units::MilliCpu,
};

/// Applies the namespace and the RBAC manifest of deploy/ for real.
async fn apply_rbac(env: &TestEnv) {
    let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let out = env
        .kubectl()
        .args([
            "apply",
            "--server-side",
            "--force-conflicts",
            "--field-manager",
            "mbcas-tests",
        ])
        .arg("-f")
        .arg(deploy.join("namespace.yaml"))
        .arg("-f")
        .arg(deploy.join("rbac.yaml"))
        .output()
        .unwrap_or_else(|e| panic!("kubectl: {e}"));
    assert!(
        out.status.success(),
        "applying deploy/rbac.yaml failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn forbidden<T: std::fmt::Debug>(what: &str, res: Result<T, kube::Error>) {
    match res {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 403, "{what}: expected 403, got {s:?}"),
        other => panic!("{what} was allowed: {other:?}"),
    }
}

async fn daemon_client(env: &TestEnv) -> Client {
    env.service_account_client("mbcas-system", "mbcas").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_account_can_do_the_daemons_job() {
    let Some(env) = TestEnv::get() else { return };
    let admin = env.client().await;
    install_crd(&admin).await;
    apply_rbac(env).await;
    let ns = TestNamespace::new(env, &admin, "rbac").await;
    let node = TestNode::new(env, &admin, "rbac", MilliCpu(4000)).await;
    let sa = daemon_client(env).await;
    let pod = create_pod(
        &admin,
        &ns.name,
        &node.name,
        &PodSpec::burstable("web", "250m", "500m"),
    )
    .await;
    let gone = create_pod(
        &admin,
        &ns.name,
        &node.name,
        &PodSpec::burstable("gone", "250m", "500m"),
    )
    .await;

    // The whole daemon, as the ServiceAccount: start-up checks, watches, controller.
    let daemon = Daemon::start(
        sa.clone(),
        &node.name,
        &["--daemon-namespace", "mbcas-system"],
    );

    // The writer, as the ServiceAccount: server-side apply of PodAllocations.
    let (store, w) = kube::runtime::reflector::store::<PodAllocation>();
    let stop = tokio_util::sync::CancellationToken::new();
    let reflect = {
        let api: Api<PodAllocation> = Api::all(sa.clone());
        let wc = kube::runtime::watcher::Config::default().labels(&format!(
            "{}={}",
            mbcas::k8s::crd::NODE_LABEL,
            node.name
        ));
        let s = stop.clone();
        tokio::spawn(async move {
            use futures::StreamExt as _;
            use kube::runtime::WatchStreamExt as _;
            let stream = kube::runtime::watcher(api, wc).default_backoff().reflect(w);
            futures::pin_mut!(stream);
            loop {
                tokio::select! {
                    () = s.cancelled() => return,
                    n = stream.next() => if n.is_none() { return },
                }
            }
        })
    };
    store.wait_until_ready().await.unwrap();
    let writer = Writer::new(sa.clone(), node.name.clone(), store.clone());
    let why = Why {
        demand: MilliCpu(700),
        weight: 250.0,
        price: 1.0,
        reason: "increase_throttled",
    };
    for p in [&pod, &gone] {
        let facts = PodFacts::from_pod(p).unwrap();
        writer
            .publish(&allocation_for(
                &facts,
                None,
                &node.name,
                MilliCpu(700),
                &why,
            ))
            .await
            .unwrap_or_else(|e| panic!("publish as the ServiceAccount: {e:?}"));
    }
    // pods/resize, status and events, as the ServiceAccount.
    let pods: Api<Pod> = Api::namespaced(admin.clone(), &ns.name);
    eventually("web resized by the ServiceAccount", WAIT, || async {
        pods.get("web")
            .await
            .ok()
            .filter(|p| cpu_limit(p) == Some(MilliCpu(700)))
    })
    .await;
    kubelet_reports(&admin, &ns.name, "web").await;
    eventually("web Applied", WAIT, || async {
        phase_is(&admin, &ns.name, "web", Phase::Applied).await
    })
    .await;
    // A refused resize: its Warning event, as the ServiceAccount.
    let web = PodFacts::from_pod(&pods.get("web").await.unwrap()).unwrap();
    writer
        .publish(&allocation_for(&web, None, &node.name, MilliCpu(900), &why))
        .await
        .unwrap_or_else(|e| panic!("publish as the ServiceAccount: {e:?}"));
    eventually("web resized again", WAIT, || async {
        pods.get("web")
            .await
            .ok()
            .filter(|p| cpu_limit(p) == Some(MilliCpu(900)))
    })
    .await;
    kubelet_refuses(&admin, &ns.name, "web", "Node didn't have enough capacity").await;
    eventually("events written by the ServiceAccount", WAIT, || async {
        let r = mbcas_event_reasons(&admin, &ns.name, "web").await;
        r.iter().any(|x| x == "ResizeFailed").then_some(())
    })
    .await;
    // Garbage collection, as the ServiceAccount.
    pods.delete("gone", &kube::api::DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    let pod_store = {
        let (r, w) = kube::runtime::reflector::store::<Pod>();
        let api: Api<Pod> = Api::all(sa.clone());
        let node_name = node.name.clone();
        let s = stop.clone();
        tokio::spawn(async move {
            use futures::StreamExt as _;
            use kube::runtime::WatchStreamExt as _;
            let stream =
                kube::runtime::watcher(api, mbcas::k8s::pods::node_pods_config(&node_name))
                    .default_backoff()
                    .reflect(w);
            futures::pin_mut!(stream);
            loop {
                tokio::select! {
                    () = s.cancelled() => return,
                    n = stream.next() => if n.is_none() { return },
                }
            }
        });
        r
    };
    pod_store.wait_until_ready().await.unwrap();
    eventually("gone to leave the pod store", WAIT, || async {
        pod_store
            .get(&kube::runtime::reflector::ObjectRef::new("gone").within(&ns.name))
            .is_none()
            .then_some(())
    })
    .await;
    writer
        .collect_garbage(&pod_store)
        .await
        .unwrap_or_else(|e| panic!("garbage collection as the ServiceAccount: {e:?}"));
    eventually("gone's allocation deleted", WAIT, || async {
        allocation(&admin, &ns.name, "gone")
            .await
            .is_none()
            .then_some(())
    })
    .await;
    // The node's lease, taken and (on stop) released as the ServiceAccount.
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(admin.clone(), "mbcas-system");
    let lease_name = mbcas::k8s::lease::lease_name(&node.name);
    let held = leases
        .get(&lease_name)
        .await
        .unwrap_or_else(|e| panic!("the daemon's lease {lease_name}: {e}"));
    assert!(
        held.spec.and_then(|s| s.holder_identity).is_some(),
        "the lease has a holder while the daemon runs"
    );
    daemon.stop().await;
    let released = leases.get(&lease_name).await.unwrap();
    assert_eq!(
        released.spec.and_then(|s| s.holder_identity),
        None,
        "released on stop"
    );
    stop.cancel();
    let _ = reflect.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_account_is_denied_everything_else() {
    let Some(env) = TestEnv::get() else { return };
    let admin = env.client().await;
    install_crd(&admin).await;
    apply_rbac(env).await;
    let ns = TestNamespace::new(env, &admin, "deny").await;
    let node = TestNode::new(env, &admin, "deny", MilliCpu(2000)).await;
    create_pod(
        &admin,
        &ns.name,
        &node.name,
        &PodSpec::burstable("web", "250m", "500m"),
    )
    .await;
    let sa = daemon_client(env).await;
    let pods: Api<Pod> = Api::namespaced(sa.clone(), &ns.name);
    // Patching the pod itself (not its resize subresource).
    let patch = serde_json::json!({"metadata": {"labels": {"owned": "yes"}}});
    forbidden(
        "patch pod",
        pods.patch("web", &PatchParams::default(), &Patch::Merge(&patch))
            .await,
    );
    let limits = serde_json::json!({"spec": {"containers": [{"name": "app", "resources": {"limits": {"cpu": "900m"}}}]}});
    forbidden(
        "patch pod spec directly",
        pods.patch("web", &PatchParams::default(), &Patch::Strategic(&limits))
            .await,
    );
    forbidden("delete pod", pods.delete("web", &Default::default()).await);
    forbidden(
        "create pod",
        pods.create(&PostParams::default(), &Pod::default()).await,
    );
    // Secrets.
    let secrets: Api<Secret> = Api::namespaced(sa.clone(), &ns.name);
    forbidden("list secrets", secrets.list(&ListParams::default()).await);
    forbidden("get secret", secrets.get("anything").await);
    // Other API groups and other core resources.
    let cms: Api<ConfigMap> = Api::namespaced(sa.clone(), &ns.name);
    forbidden(
        "create configmap",
        cms.create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({"metadata": {"name": "x"}}))
                .unwrap_or_default(),
        )
        .await,
    );
    let deps: Api<Deployment> = Api::namespaced(sa.clone(), &ns.name);
    forbidden("list deployments", deps.list(&ListParams::default()).await);
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(sa.clone());
    forbidden(
        "patch node",
        nodes
            .patch(&node.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await,
    );
    // Leases: only in its own namespace, and never deleted.
    let foreign: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(sa.clone(), &ns.name);
    let lease = k8s_openapi::api::coordination::v1::Lease {
        metadata: kube::api::ObjectMeta {
            name: Some("x".to_owned()),
            ..Default::default()
        },
        spec: None,
    };
    forbidden(
        "create a lease in another namespace",
        foreign.create(&PostParams::default(), &lease).await,
    );
    let own: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(sa.clone(), "mbcas-system");
    forbidden(
        "delete a lease",
        own.delete("anything", &Default::default()).await,
    );
    forbidden("list leases", own.list(&ListParams::default()).await);
    // And it cannot touch the CRD itself.
    let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
        Api::all(sa.clone());
    forbidden(
        "delete CRD",
        crds.delete("podallocations.allocation.mbcas.io", &Default::default())
            .await,
    );
    // The allowed reads still work (the denials above are not a broken client).
    let listed = pods
        .list(&ListParams::default())
        .await
        .unwrap_or_else(|e| panic!("list pods as the ServiceAccount: {e}"));
    assert_eq!(listed.items.len(), 1);
}
