//! Control-plane tier smoke test: the real kube-apiserver from
//! `cargo xtask testenv` has what MBCAS relies on — the `pods/resize`
//! subresource, in-place CPU limit changes, validation of limits against
//! requests, RBAC with impersonation, and ownerReference garbage collection.

mod common;

use std::time::Duration;

use common::apiserver::{TestEnv, TestNamespace, TestNode, eventually};
use k8s_openapi::{
    api::{
        core::v1::{ConfigMap, Container, Pod, PodSpec, ResourceRequirements},
        rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject},
    },
    apimachinery::pkg::{
        api::resource::Quantity,
        apis::meta::v1::{ObjectMeta, OwnerReference},
    },
};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
};
use mbcas::units::MilliCpu;

fn cpu(q: &str) -> std::collections::BTreeMap<String, Quantity> {
    [("cpu".to_owned(), Quantity(q.to_owned()))].into()
}

/// A Burstable pod (request < limit) bound to `node`.
async fn burstable_pod(client: &Client, ns: &str, node: &str) -> Pod {
    let pod = Pod {
        metadata: ObjectMeta {
            name: Some("burstable".into()),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            node_name: Some(node.to_owned()),
            containers: vec![Container {
                name: "app".into(),
                image: Some("registry.invalid/app:1".into()),
                resources: Some(ResourceRequirements {
                    requests: Some(cpu("100m")),
                    limits: Some(cpu("200m")),
                    ..ResourceRequirements::default()
                }),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
        ..Pod::default()
    };
    Api::<Pod>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &pod)
        .await
        .unwrap_or_else(|e| panic!("create pod: {e}"))
}

fn limit_patch(limit: &str) -> serde_json::Value {
    serde_json::json!({
        "spec": { "containers": [{ "name": "app", "resources": { "limits": { "cpu": limit } } }] }
    })
}

fn cpu_limit(pod: &Pod) -> Option<String> {
    pod.spec.as_ref()?.containers[0]
        .resources
        .as_ref()?
        .limits
        .as_ref()?
        .get("cpu")
        .map(|q| q.0.clone())
}

#[tokio::test]
async fn discovery_lists_pods_resize() {
    let Some(env) = TestEnv::get() else { return };
    let client = env.client().await;
    let version = client
        .apiserver_version()
        .await
        .unwrap_or_else(|e| panic!("/version: {e}"));
    // The release the runner started (`cargo xtask test` says which through
    // MBCAS_TESTENV_KUBERNETES); else any from 1.35 (in-place resize GA).
    match std::env::var("MBCAS_TESTENV_KUBERNETES") {
        Ok(want) if !want.is_empty() => assert_eq!(
            version.git_version, want,
            "the test environment runs another release than the runner started"
        ),
        _ => {
            let minor: u32 = version.minor.trim_end_matches('+').parse().unwrap_or(0);
            assert!(
                version.major == "1" && minor >= 35,
                "Kubernetes {}: MBCAS needs 1.35 or later",
                version.git_version
            );
        }
    }
    let core = client
        .list_core_api_resources("v1")
        .await
        .unwrap_or_else(|e| panic!("discovery /api/v1: {e}"));
    let resize = core
        .resources
        .iter()
        .find(|r| r.name == "pods/resize")
        .expect("no pods/resize in /api/v1");
    for verb in ["get", "patch", "update"] {
        assert!(
            resize.verbs.iter().any(|v| v == verb),
            "pods/resize lacks verb {verb}: {:?}",
            resize.verbs
        );
    }
}

#[tokio::test]
async fn cpu_limit_is_resized_in_place_and_validated() {
    let Some(env) = TestEnv::get() else { return };
    let client = env.client().await;
    let ns = TestNamespace::new(env, &client, "resize").await;
    let node = TestNode::new(env, &client, "resize", MilliCpu(4000)).await;
    let created = burstable_pod(&client, &ns.name, &node.name).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);

    let resized = pods
        .patch_resize(
            "burstable",
            &PatchParams::default(),
            &Patch::Strategic(limit_patch("350m")),
        )
        .await
        .unwrap_or_else(|e| panic!("resize to 350m: {e}"));
    assert_eq!(cpu_limit(&resized).as_deref(), Some("350m"));
    assert_eq!(
        resized.metadata.uid, created.metadata.uid,
        "resize must not recreate the pod"
    );
    let stored = pods
        .get("burstable")
        .await
        .unwrap_or_else(|e| panic!("get pod: {e}"));
    assert_eq!(cpu_limit(&stored).as_deref(), Some("350m"));

    // The same change through the main resource is refused: resources are
    // immutable there, only pods/resize may change them.
    let direct = pods
        .patch(
            "burstable",
            &PatchParams::default(),
            &Patch::Strategic(limit_patch("400m")),
        )
        .await;
    match direct {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 422, "{s:?}"),
        other => panic!("patching resources on the pod itself must fail, got {other:?}"),
    }

    // A limit below the request (100m) is rejected by validation.
    let below = pods
        .patch_resize(
            "burstable",
            &PatchParams::default(),
            &Patch::Strategic(limit_patch("50m")),
        )
        .await;
    match below {
        Err(kube::Error::Api(s)) => {
            assert_eq!(s.code, 422, "{s:?}");
            assert!(
                s.message.contains("request"),
                "rejection should name the request: {}",
                s.message
            );
        }
        other => panic!("a limit below the request must be rejected, got {other:?}"),
    }
    let stored = pods
        .get("burstable")
        .await
        .unwrap_or_else(|e| panic!("get pod: {e}"));
    assert_eq!(cpu_limit(&stored).as_deref(), Some("350m"));
}

#[tokio::test]
async fn rbac_applies_to_an_impersonated_service_account() {
    let Some(env) = TestEnv::get() else { return };
    let client = env.client().await;
    let ns = TestNamespace::new(env, &client, "rbac").await;
    let node = TestNode::new(env, &client, "rbac", MilliCpu(2000)).await;
    burstable_pod(&client, &ns.name, &node.name).await;
    let as_sa = env.service_account_client(&ns.name, "default").await;
    let sa_pods: Api<Pod> = Api::namespaced(as_sa, &ns.name);

    match sa_pods.get("burstable").await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 403, "{s:?}"),
        other => panic!("without a Role the ServiceAccount must be forbidden, got {other:?}"),
    }

    let role = Role {
        metadata: ObjectMeta {
            name: Some("pod-resizer".into()),
            ..ObjectMeta::default()
        },
        rules: Some(vec![
            PolicyRule {
                api_groups: Some(vec![String::new()]),
                resources: Some(vec!["pods".into()]),
                verbs: vec!["get".into()],
                ..PolicyRule::default()
            },
            PolicyRule {
                api_groups: Some(vec![String::new()]),
                resources: Some(vec!["pods/resize".into()]),
                verbs: vec!["patch".into()],
                ..PolicyRule::default()
            },
        ]),
    };
    Api::<Role>::namespaced(client.clone(), &ns.name)
        .create(&PostParams::default(), &role)
        .await
        .unwrap_or_else(|e| panic!("create role: {e}"));
    let binding = RoleBinding {
        metadata: ObjectMeta {
            name: Some("pod-resizer".into()),
            ..ObjectMeta::default()
        },
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "Role".into(),
            name: "pod-resizer".into(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: "default".into(),
            namespace: Some(ns.name.clone()),
            ..Subject::default()
        }]),
    };
    Api::<RoleBinding>::namespaced(client.clone(), &ns.name)
        .create(&PostParams::default(), &binding)
        .await
        .unwrap_or_else(|e| panic!("create rolebinding: {e}"));

    // RBAC is read from an informer cache: allow a moment for it to catch up.
    eventually(
        "the RoleBinding to take effect",
        Duration::from_secs(10),
        || async { sa_pods.get("burstable").await.ok() },
    )
    .await;
    let resized = sa_pods
        .patch_resize(
            "burstable",
            &PatchParams::default(),
            &Patch::Strategic(limit_patch("300m")),
        )
        .await
        .unwrap_or_else(|e| panic!("resize as the ServiceAccount: {e}"));
    assert_eq!(cpu_limit(&resized).as_deref(), Some("300m"));
    // ...but the Role grants nothing on the pod itself beyond get.
    match sa_pods
        .patch(
            "burstable",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"labels": {"x": "y"}}})),
        )
        .await
    {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 403, "{s:?}"),
        other => panic!("patching the pod itself must be forbidden, got {other:?}"),
    }
}

#[tokio::test]
async fn objects_owned_by_a_pod_are_garbage_collected_with_it() {
    let Some(env) = TestEnv::get() else { return };
    let client = env.client().await;
    let ns = TestNamespace::new(env, &client, "gc").await;
    let node = TestNode::new(env, &client, "gc", MilliCpu(2000)).await;
    let pod = burstable_pod(&client, &ns.name, &node.name).await;
    let owned = ConfigMap {
        metadata: ObjectMeta {
            name: Some("owned-by-pod".into()),
            owner_references: Some(vec![OwnerReference {
                api_version: "v1".into(),
                kind: "Pod".into(),
                name: "burstable".into(),
                uid: pod.metadata.uid.clone().unwrap_or_default(),
                ..OwnerReference::default()
            }]),
            ..ObjectMeta::default()
        },
        ..ConfigMap::default()
    };
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    cms.create(&PostParams::default(), &owned)
        .await
        .unwrap_or_else(|e| panic!("create owned configmap: {e}"));
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    // No kubelet: delete with grace period 0 so the pod goes away at once.
    pods.delete(
        "burstable",
        &kube::api::DeleteParams::default().grace_period(0),
    )
    .await
    .unwrap_or_else(|e| panic!("delete pod: {e}"));
    eventually(
        "the garbage collector to delete the pod's ConfigMap",
        Duration::from_secs(60),
        || async { matches!(cms.get_opt("owned-by-pod").await, Ok(None)).then_some(()) },
    )
    .await;
}
