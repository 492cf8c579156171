use super::*;

fn pod(v: serde_json::Value) -> Pod {
    serde_json::from_value(v).unwrap()
}

fn burstable(ns: &str, labels: serde_json::Value) -> Pod {
    pod(serde_json::json!({
        "metadata": {"name": "web", "namespace": ns, "uid": "u-1", "labels": labels},
        "spec": {"nodeName": "n1", "containers": [
            {"name": "app", "resources": {"requests": {"cpu": "250m"}, "limits": {"cpu": "500m"}}},
            {"name": "side", "resources": {"requests": {"cpu": "0.1"}, "limits": {"cpu": "1"}}}
        ]},
        "status": {"phase": "Running", "qosClass": "Burstable", "containerStatuses": [
            {"name": "app", "image": "x", "imageID": "", "ready": true, "restartCount": 0,
             "containerID": "containerd://abc123", "resources": {"limits": {"cpu": "500m"}}},
            {"name": "side", "image": "x", "imageID": "", "ready": true, "restartCount": 0,
             "resources": {"limits": {"cpu": "1"}}}
        ]}
    }))
}

fn excluded() -> BTreeSet<String> {
    ["kube-system".to_owned(), "mbcas-system".to_owned()].into()
}

#[test]
fn quantities_round_up_to_millicores_like_kubernetes() {
    for (s, m) in [
        ("1", 1000),
        ("250m", 250),
        ("0.5", 500),
        ("1.0001", 1001),
        ("100u", 1),
        ("1500000n", 2),
        ("1e3", 1_000_000),
        ("1.5E-1", 150),
        ("2k", 2_000_000),
        ("+3", 3000),
        ("0", 0),
        ("1Ki", 1_024_000),
    ] {
        assert_eq!(quantity_millis(s), Some(MilliCpu(m)), "{s}");
    }
    for bad in [
        "", "-1", "1x", "abc", "1..2", ".", "m", "1e", "1e99999", "1Ei1",
    ] {
        assert_eq!(quantity_millis(bad), None, "{bad:?}");
    }
}

#[test]
fn facts_of_a_burstable_pod() {
    let f = PodFacts::from_pod(&burstable("default", serde_json::json!({}))).unwrap();
    assert_eq!(f.request(), MilliCpu(350));
    assert_eq!(f.limit(), Some(MilliCpu(1500)));
    assert_eq!(f.status_limit(), Some(MilliCpu(1500)));
    assert_eq!(f.containers[0].container_id.as_deref(), Some("abc123"));
    assert!(f.running);
    assert_eq!(f.exclusion(&excluded()), None);
    assert_eq!(f.weight(false), 350.0);
    assert_eq!(f.resize, ResizeState::Idle);
}

#[test]
fn exclusions_follow_the_safety_rules() {
    let ns = PodFacts::from_pod(&burstable("kube-system", serde_json::json!({}))).unwrap();
    assert_eq!(ns.exclusion(&excluded()), Some(Exclusion::Namespace));
    let ign = PodFacts::from_pod(&burstable(
        "default",
        serde_json::json!({"mbcas.io/ignore": "true"}),
    ))
    .unwrap();
    assert_eq!(ign.exclusion(&excluded()), Some(Exclusion::OptedOut));

    let mut p = burstable("default", serde_json::json!({}));
    if let Some(spec) = p.spec.as_mut() {
        spec.containers[1].resize_policy =
            Some(vec![k8s_openapi::api::core::v1::ContainerResizePolicy {
                resource_name: "cpu".into(),
                restart_policy: "RestartContainer".into(),
            }]);
    }
    let f = PodFacts::from_pod(&p).unwrap();
    assert_eq!(f.exclusion(&excluded()), Some(Exclusion::RestartPolicy));

    let mut p = burstable("default", serde_json::json!({}));
    if let Some(spec) = p.spec.as_mut() {
        spec.containers[1].resources = None;
    }
    let f = PodFacts::from_pod(&p).unwrap();
    assert_eq!(f.limit(), None);
    assert_eq!(f.exclusion(&excluded()), Some(Exclusion::NoLimit));
}

#[test]
fn guaranteed_is_recognised_with_or_without_status() {
    let spec = serde_json::json!({"containers": [{"name": "a", "resources": {
        "limits": {"cpu": "1", "memory": "1Gi"}}}]});
    let mut p = pod(serde_json::json!({
        "metadata": {"name": "g", "namespace": "default", "uid": "u-2"}, "spec": spec}));
    let f = PodFacts::from_pod(&p).unwrap();
    assert_eq!(f.qos, QosClass::Guaranteed);
    assert_eq!(f.exclusion(&excluded()), Some(Exclusion::Guaranteed));
    assert!(!f.running);
    // Requests different from limits: Burstable.
    if let Some(s) = p.spec.as_mut() {
        s.containers[0].resources = serde_json::from_value(serde_json::json!({
            "requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"cpu": "1", "memory": "1Gi"}}))
        .ok();
    }
    let f = PodFacts::from_pod(&p).unwrap();
    assert_eq!(f.qos, QosClass::Burstable);
}

#[test]
fn bad_quantities_name_the_field() {
    let mut p = burstable("default", serde_json::json!({}));
    if let Some(spec) = p.spec.as_mut() {
        spec.containers[1].resources = serde_json::from_value(serde_json::json!({
            "limits": {"cpu": "lots"}}))
        .ok();
    }
    let err = PodFacts::from_pod(&p).err();
    assert_eq!(
        err,
        Some(PodError::Quantity {
            pod: "default/web".into(),
            field: "spec.containers[1].resources.limits.cpu".into(),
            value: "lots".into(),
        })
    );
    let no_uid = pod(
        serde_json::json!({"metadata": {"name": "x", "namespace": "d"}, "spec": {"containers": []}}),
    );
    assert_eq!(
        PodFacts::from_pod(&no_uid).err(),
        Some(PodError::Missing("metadata.uid"))
    );
}

#[test]
fn resize_conditions_are_read() {
    for (cond, reason, want) in [
        (
            "PodResizePending",
            "Infeasible",
            ResizeState::Infeasible("too big".into()),
        ),
        (
            "PodResizePending",
            "Deferred",
            ResizeState::Deferred("too big".into()),
        ),
        ("PodResizeInProgress", "", ResizeState::InProgress),
        (
            "PodResizeInProgress",
            "Error",
            ResizeState::Error("too big".into()),
        ),
    ] {
        let mut p = burstable("default", serde_json::json!({}));
        if let Some(st) = p.status.as_mut() {
            st.conditions = serde_json::from_value(serde_json::json!([
                {"type": cond, "status": "True", "reason": reason, "message": "too big"}]))
            .ok();
        }
        let f = PodFacts::from_pod(&p).unwrap();
        assert_eq!(f.resize, want, "{cond} {reason}");
    }
}

#[test]
fn priority_weighting_is_off_by_default_and_bounded() {
    let mut p = burstable("default", serde_json::json!({}));
    if let Some(s) = p.spec.as_mut() {
        s.priority = Some(2_000_000_000);
    }
    let f = PodFacts::from_pod(&p).unwrap();
    assert_eq!(f.weight(false), 350.0);
    assert_eq!(f.weight(true), 1050.0);
}

#[test]
fn prune_keeps_what_the_facts_need() {
    let mut p = burstable("default", serde_json::json!({"mbcas.io/ignore": "false"}));
    let before = PodFacts::from_pod(&p).unwrap();
    prune(&mut p);
    assert_eq!(PodFacts::from_pod(&p), Ok(before));
}

#[test]
fn memory_pinned_when_a_memory_limit_has_no_other_request() {
    let mut p = burstable("default", serde_json::json!({}));
    if let Some(spec) = p.spec.as_mut() {
        let res = |v| serde_json::from_value(v).unwrap();
        // A memory limit alone (the request defaults to it) and one with an
        // equal request: pinned; a smaller request: free to burst.
        spec.containers[0].resources = Some(res(serde_json::json!({
            "requests": {"cpu": "250m"}, "limits": {"cpu": "500m", "memory": "64Mi"}})));
        spec.containers[1].resources = Some(res(serde_json::json!({
            "requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"cpu": "1", "memory": "64Mi"}})));
    }
    let f = PodFacts::from_pod(&p).unwrap();
    assert!(f.containers.iter().all(|c| c.memory_pinned), "{f:?}");
    if let Some(spec) = p.spec.as_mut() {
        spec.containers[1].resources = Some(serde_json::from_value(serde_json::json!({
            "requests": {"cpu": "100m", "memory": "16Mi"}, "limits": {"cpu": "1", "memory": "64Mi"}})).unwrap());
    }
    let f = PodFacts::from_pod(&p).unwrap();
    assert!(
        f.containers[0].memory_pinned && !f.containers[1].memory_pinned,
        "{f:?}"
    );
    // No memory limit: never pinned.
    let f = PodFacts::from_pod(&burstable("default", serde_json::json!({}))).unwrap();
    assert!(f.containers.iter().all(|c| !c.memory_pinned));
}

/// A managed-fields entry of a resize of `containers`' CPU limits.
fn resize_entry(manager: &str, time: &str, containers: &[&str]) -> serde_json::Value {
    let owned: serde_json::Map<String, serde_json::Value> = containers
        .iter()
        .map(|c| {
            (
                format!("k:{{\"name\":\"{c}\"}}"),
                serde_json::json!({"f:resources": {"f:limits": {"f:cpu": {}}}}),
            )
        })
        .collect();
    serde_json::json!({
        "manager": manager, "operation": "Update", "subresource": "resize",
        "apiVersion": "v1", "time": time, "fieldsType": "FieldsV1",
        "fieldsV1": {"f:spec": {"f:containers": owned}}
    })
}

#[test]
fn the_last_resize_by_someone_else_is_read_from_the_managed_fields() {
    let mut p = burstable("default", serde_json::json!({}));
    let created = serde_json::json!({
        "manager": "kubectl-client-side-apply", "operation": "Update", "apiVersion": "v1",
        "time": "2026-12-07T05:00:00Z", "fieldsType": "FieldsV1",
        "fieldsV1": {"f:spec": {"f:containers": {"k:{\"name\":\"app\"}": {"f:resources": {"f:limits": {"f:cpu": {}}}}}}}
    });
    let status = serde_json::json!({
        "manager": "kubelet", "operation": "Update", "subresource": "status", "apiVersion": "v1",
        "time": "2026-12-07T05:09:00Z", "fieldsType": "FieldsV1", "fieldsV1": {"f:status": {}}
    });
    let set = |p: &mut Pod, entries: Vec<serde_json::Value>| {
        p.metadata.managed_fields = Some(serde_json::from_value(entries.into()).unwrap());
    };
    // The creator and the kubelet own limits and status: nobody resized it.
    set(&mut p, vec![created.clone(), status.clone()]);
    assert_eq!(PodFacts::from_pod(&p).unwrap().foreign_resize, None);
    // MBCAS's own resizes (and those made before it named its field manager).
    set(
        &mut p,
        vec![
            created.clone(),
            resize_entry(FIELD_MANAGER, "2026-12-07T05:01:00Z", &["app"]),
            resize_entry("unknown", "2026-12-07T05:02:00Z", &["side"]),
        ],
    );
    assert_eq!(PodFacts::from_pod(&p).unwrap().foreign_resize, None);
    // Two other managers: the later one; an entry that owns no CPU limit
    // any more (MBCAS set it since) is not a resize of it.
    let mut no_cpu = resize_entry("vpa-updater", "2026-12-07T05:08:00Z", &[]);
    no_cpu["fieldsV1"]["f:spec"]["f:containers"] = serde_json::json!({"k:{\"name\":\"app\"}": {"f:resources": {"f:limits": {"f:memory": {}}}}});
    set(
        &mut p,
        vec![
            created,
            status,
            resize_entry("kubectl-patch", "2026-12-07T05:03:00Z", &["app", "side"]),
            resize_entry("other", "2026-12-07T05:04:00Z", &["side"]),
            no_cpu,
            resize_entry(FIELD_MANAGER, "2026-12-07T05:05:00Z", &["app"]),
        ],
    );
    let seen = PodFacts::from_pod(&p).unwrap().foreign_resize.unwrap();
    assert_eq!(seen.manager, "other");
    assert_eq!(seen.at.to_string(), "2026-12-07T05:04:00Z");
    assert_eq!(seen.containers, vec!["side".to_owned()]);
    // The reflector keeps only the resizes' entries.
    prune(&mut p);
    let kept: Vec<_> = p
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter_map(|e| e.manager.clone())
        .collect();
    assert_eq!(
        kept,
        ["kubectl-patch", "other", "vpa-updater", FIELD_MANAGER]
    );
    assert_eq!(PodFacts::from_pod(&p).unwrap().foreign_resize, Some(seen));
}

#[test]
fn the_current_limit_is_the_applied_one_when_the_kubelet_refused_the_spec() {
    let mut f = PodFacts::from_pod(&burstable("default", serde_json::json!({}))).unwrap();
    // MBCAS asked 900 m + 1 core; the kubelet still reports 500 m + 1 core.
    f.containers[0].limit = Some(MilliCpu(900));
    assert_eq!(
        f.current_limit(),
        Some(MilliCpu(1900)),
        "in flight: the spec's"
    );
    f.resize = ResizeState::Deferred("later".into());
    assert_eq!(
        f.current_limit(),
        Some(MilliCpu(1900)),
        "deferred: the spec's"
    );
    for refused in [
        ResizeState::Infeasible("no".into()),
        ResizeState::Error("oops".into()),
    ] {
        f.resize = refused;
        assert_eq!(f.current_limit(), Some(MilliCpu(1500)), "{:?}", f.resize);
    }
    f.containers[1].status_limit = None;
    assert_eq!(
        f.current_limit(),
        Some(MilliCpu(1900)),
        "nothing reported: the spec's"
    );
}

/// Under churn a pod may be gone from the store before the controller reads
/// its wake-up: the store goes on regardless, and every wake-up arrives
/// (kube's shared-reflector subscriber hung on such a pod and, its buffer
/// full, stopped the store).
#[tokio::test]
async fn the_pod_store_never_waits_for_the_controller() {
    use kube::runtime::watcher::Event;
    let named = |name: &str| {
        let mut p = burstable("default", serde_json::json!({}));
        p.metadata.name = Some(name.into());
        p.metadata.uid = Some(format!("u-{name}"));
        p
    };
    let mut events = vec![Ok(Event::Init), Ok(Event::InitDone)];
    // More changes than the wake-up buffer holds, each pod deleted at once.
    let n = POD_TRIGGERS + 10;
    for i in 0..n {
        events.push(Ok(Event::Apply(named(&format!("p{i}")))));
        events.push(Ok(Event::Delete(named(&format!("p{i}")))));
    }
    events.push(Ok(Event::Apply(named("last"))));
    let (store, stream, mut triggers) = reflect_pods(futures::stream::iter(events));
    // Driven to its end with nobody reading the wake-ups: it does not block.
    let driven = tokio::time::timeout(std::time::Duration::from_secs(5), stream.count()).await;
    assert!(driven.is_ok(), "the pod stream blocked on unread wake-ups");
    let names: Vec<String> = store.state().iter().map(|p| p.name_any()).collect();
    assert_eq!(names, ["last"]);
    // The wake-ups that fit are there, the deleted pods' included.
    let mut woken = 0;
    while triggers.try_recv().is_ok() {
        woken += 1;
    }
    assert_eq!(
        woken,
        POD_TRIGGERS + 1,
        "the buffer's worth (and the sender's slot)"
    );
}

/// A CPU budget at pod level (`spec.resources`, KEP-2837): read, and the pod
/// left alone with its own reason, with or without container limits; a
/// malformed one is an error naming the field.
#[test]
fn pod_level_cpu_is_read_and_left_alone() {
    let mut p = burstable("default", serde_json::json!({}));
    if let Some(spec) = p.spec.as_mut() {
        spec.resources = serde_json::from_value(serde_json::json!({
            "requests": {"cpu": "400m"}, "limits": {"cpu": "2"}}))
        .unwrap();
    }
    let f = PodFacts::from_pod(&p).unwrap();
    assert_eq!(
        (f.pod_limit, f.pod_request),
        (Some(MilliCpu(2000)), Some(MilliCpu(400)))
    );
    assert_eq!(f.exclusion(&excluded()), Some(Exclusion::PodLevel));
    // Containers without limits, a pod-level limit only: still its reason,
    // not "no CPU limit".
    if let Some(spec) = p.spec.as_mut() {
        for c in &mut spec.containers {
            c.resources = None;
        }
        spec.resources =
            serde_json::from_value(serde_json::json!({"limits": {"cpu": "1"}})).unwrap();
    }
    let f = PodFacts::from_pod(&p).unwrap();
    assert_eq!(f.exclusion(&excluded()), Some(Exclusion::PodLevel));
    // A pod-level memory budget alone says nothing about CPU.
    if let Some(spec) = p.spec.as_mut() {
        spec.resources =
            serde_json::from_value(serde_json::json!({"limits": {"memory": "1Gi"}})).unwrap();
    }
    let f = PodFacts::from_pod(&p).unwrap();
    assert_eq!(f.exclusion(&excluded()), Some(Exclusion::NoLimit));
    if let Some(spec) = p.spec.as_mut() {
        spec.resources =
            serde_json::from_value(serde_json::json!({"limits": {"cpu": "lots"}})).unwrap();
    }
    assert_eq!(
        PodFacts::from_pod(&p).err(),
        Some(PodError::Quantity {
            pod: "default/web".into(),
            field: "spec.resources.limits.cpu".into(),
            value: "lots".into(),
        })
    );
}
