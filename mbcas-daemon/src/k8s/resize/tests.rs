use super::*;
use crate::{
    cgroup::kubernetes::QosClass,
    k8s::{
        crd::PodAllocationSpec,
        pods::{ContainerFacts, PodFacts},
    },
};

fn cfg() -> ControllerConfig {
    ControllerConfig::new("n1")
}

fn facts(limit: u64, request: u64, status_limit: Option<u64>) -> PodFacts {
    let mut app = ContainerFacts::limited("app", request, limit);
    app.status_limit = status_limit.map(MilliCpu);
    PodFacts::burstable("uid-1", "default", vec![app])
}

fn pa(desired: u64, status: Option<PodAllocationStatus>) -> PodAllocation {
    let mut pa = PodAllocation::new(
        "web",
        PodAllocationSpec {
            pod_name: "web".into(),
            pod_uid: "uid-1".into(),
            node_name: "n1".into(),
            cpu_limit: CpuQuantity(MilliCpu(desired)),
            containers: vec![ContainerAllocation {
                name: "app".into(),
                cpu_limit: CpuQuantity(MilliCpu(desired)),
            }],
            demand: CpuQuantity(MilliCpu(desired)),
            weight: 250.0,
            price: 1.0,
            reason: "increase_throttled".into(),
            original: Vec::new(),
        },
    );
    pa.metadata.namespace = Some("default".into());
    pa.metadata.generation = Some(3);
    pa.status = status;
    pa
}

fn at(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// The wall clock a plan is made at (condition transition times).
fn wall() -> Timestamp {
    Timestamp::from_second(1_800_000_000).unwrap()
}

#[test]
fn only_a_status_write_answered_404_means_the_allocation_is_gone() {
    let api = |code| {
        kube::Error::Api(
            kube::core::Status::failure("x", "y")
                .with_code(code)
                .boxed(),
        )
    };
    let status = |code| ResizeError::Status {
        name: "a".into(),
        source: api(code),
    };
    assert!(status(404).gone());
    assert!(!status(409).gone());
    assert!(!status(500).gone());
    // A resize answered 404 is the pod's, not the allocation's.
    assert!(
        !ResizeError::Resize {
            name: "a".into(),
            source: api(404),
        }
        .gone()
    );
}

#[test]
fn same_record_ignores_only_the_transition_time() {
    let f = facts(700, 250, Some(700));
    let mem = Memory::default();
    let a = plan(&pa(700, None), Some(Ok(&f)), &cfg(), &mem, at(100), wall()).status;
    let later = Timestamp::from_second(wall().as_second() + 60).unwrap();
    let b = plan(&pa(700, None), Some(Ok(&f)), &cfg(), &mem, at(160), later).status;
    assert_eq!(a.phase, Phase::Applied);
    assert_ne!(a, b, "the transition times differ");
    assert!(same_record(&a, &b));
    let mut c = b.clone();
    c.message = Some("something else".into());
    assert!(!same_record(&a, &c));
    c = b;
    c.conditions.clear();
    assert!(!same_record(&a, &c));
}

#[test]
fn first_increase_records_the_original_and_requests_a_resize() {
    let f = facts(500, 250, Some(500));
    let p = plan(
        &pa(700, None),
        Some(Ok(&f)),
        &cfg(),
        &Memory::default(),
        at(100),
        wall(),
    );
    assert_eq!(p.resize, Some(vec![("app".into(), MilliCpu(700))]));
    assert_eq!(p.status.phase, Phase::Pending);
    assert_eq!(p.status.reason.as_deref(), Some("ResizeRequested"));
    assert_eq!(
        p.status.original,
        vec![OriginalLimit {
            name: "app".into(),
            cpu_limit: Some(CpuQuantity(MilliCpu(500)))
        }]
    );
    assert_eq!(p.status.observed_generation, Some(3));
    // No event (the kubelet posts its own); the request itself is not
    // written unless the original needs recording (reconcile's business).
    assert_eq!(p.event, None);
    assert!(p.quiet);
    assert_eq!(
        p.requeue,
        Some(at(10)),
        "looked at again when the grace ends"
    );
    assert_eq!(
        resize_patch(p.resize.as_deref().unwrap_or_default()),
        serde_json::json!({"spec": {"containers": [
            {"name": "app", "resources": {"limits": {"cpu": "700m"}}}]}})
    );
}

#[test]
fn the_original_is_never_overwritten() {
    let old = PodAllocationStatus {
        original: vec![OriginalLimit {
            name: "app".into(),
            cpu_limit: Some(CpuQuantity(MilliCpu(400))),
        }],
        ..Default::default()
    };
    let f = facts(600, 250, Some(600));
    let p = plan(
        &pa(800, Some(old.clone())),
        Some(Ok(&f)),
        &cfg(),
        &Memory::default(),
        at(0),
        wall(),
    );
    assert_eq!(p.status.original, old.original);
}

#[test]
fn never_below_the_request_and_the_policys_decision_in_one_patch() {
    let f = facts(500, 300, Some(500));
    // 100m asked: the request (300m) wins.
    let p = plan(
        &pa(100, None),
        Some(Ok(&f)),
        &cfg(),
        &Memory::default(),
        at(0),
        wall(),
    );
    assert_eq!(p.resize, Some(vec![("app".into(), MilliCpu(300))]));
    assert!(
        p.status
            .message
            .as_deref()
            .unwrap_or("")
            .contains("request"),
        "{:?}",
        p.status.message
    );
    // 5 cores asked from 500m (a throttled pod raised to its fair share at
    // once): one patch, not a train of ×1.5 steps.
    let p = plan(
        &pa(5000, None),
        Some(Ok(&f)),
        &cfg(),
        &Memory::default(),
        at(0),
        wall(),
    );
    assert_eq!(p.resize, Some(vec![("app".into(), MilliCpu(5000))]));
}

#[test]
fn a_resize_never_turns_a_burstable_pod_guaranteed() {
    // Memory limit = request: at its CPU request the pod would be Guaranteed,
    // which the API refuses on a resize.
    let mut app = ContainerFacts::limited("app", 100, 500);
    app.memory_pinned = true;
    let f = PodFacts::burstable("uid-1", "default", vec![app.clone()]);
    let p = plan(
        &pa(100, None),
        Some(Ok(&f)),
        &cfg(),
        &Memory::default(),
        at(0),
        wall(),
    );
    assert_eq!(p.resize, Some(vec![("app".into(), MilliCpu(110))]));
    assert!(
        p.status
            .message
            .as_deref()
            .unwrap_or("")
            .contains("Guaranteed"),
        "{:?}",
        p.status.message
    );
    // Memory free to burst: the request is a fine limit.
    app.memory_pinned = false;
    let f = PodFacts::burstable("uid-1", "default", vec![app]);
    let p = plan(
        &pa(100, None),
        Some(Ok(&f)),
        &cfg(),
        &Memory::default(),
        at(0),
        wall(),
    );
    assert_eq!(p.resize, Some(vec![("app".into(), MilliCpu(100))]));
}

#[test]
fn opting_out_puts_the_original_limits_back_once() {
    // MBCAS raised it 500m → 800m; its owner labels it mbcas.io/ignore=true.
    let mut f = facts(800, 250, Some(800));
    f.ignored = true;
    let mut a = pa(800, None);
    a.spec.original = vec![OriginalLimit {
        name: "app".into(),
        cpu_limit: Some(CpuQuantity(MilliCpu(500))),
    }];
    let p = plan(&a, Some(Ok(&f)), &cfg(), &Memory::default(), at(0), wall());
    assert_eq!(p.resize, Some(vec![("app".into(), MilliCpu(500))]));
    assert_eq!(p.status.phase, Phase::Skipped);
    assert_eq!(p.status.reason.as_deref(), Some("OptedOut"));
    // Just patched, the watch not caught up: not again.
    let mem = Memory {
        last_change: Some(at(0)),
        patched: Some(vec![("app".into(), MilliCpu(500))]),
        ..Default::default()
    };
    let p = plan(&a, Some(Ok(&f)), &cfg(), &mem, at(2), wall());
    assert_eq!(p.resize, None);
    // Back at its original: left alone.
    let mut back = facts(500, 250, Some(500));
    back.ignored = true;
    let p = plan(&a, Some(Ok(&back)), &cfg(), &mem, at(30), wall());
    assert_eq!((p.resize, p.status.phase), (None, Phase::Skipped));
    // No originals on record: nothing to put back.
    let p = plan(
        &pa(800, None),
        Some(Ok(&f)),
        &cfg(),
        &Memory::default(),
        at(0),
        wall(),
    );
    assert_eq!(p.resize, None);
}

#[test]
fn the_policy_paces_changes_not_the_controller() {
    // Patched 10 s ago; a neighbour capped to its share under contention is
    // lowered at once, and so is a raise: the policy's cooldown and steps
    // already decided when.
    let f = facts(2000, 100, Some(2000));
    let mem = Memory {
        last_change: Some(at(100)),
        ..Default::default()
    };
    let p = plan(&pa(150, None), Some(Ok(&f)), &cfg(), &mem, at(110), wall());
    assert_eq!(p.resize, Some(vec![("app".into(), MilliCpu(150))]));
    let p = plan(&pa(3000, None), Some(Ok(&f)), &cfg(), &mem, at(110), wall());
    assert_eq!(p.resize, Some(vec![("app".into(), MilliCpu(3000))]));
}

#[test]
fn its_own_patch_is_not_repeated_while_the_pod_watch_catches_up() {
    // Patched 500m → 700m at t=100; this copy of the pod still shows 500m.
    let f = facts(500, 250, Some(500));
    let requested = PodAllocationStatus {
        phase: Phase::Pending,
        reason: Some("ResizeRequested".into()),
        ..Default::default()
    };
    let mem = Memory {
        last_change: Some(at(100)),
        patched: Some(vec![("app".into(), MilliCpu(700))]),
        ..Default::default()
    };
    let p = plan(
        &pa(700, Some(requested.clone())),
        Some(Ok(&f)),
        &cfg(),
        &mem,
        at(101),
        wall(),
    );
    assert_eq!(p.resize, None);
    assert_eq!(p.event, None);
    assert_eq!(p.status, requested, "the status is left as it is");
    assert_eq!(p.requeue, Some(at(9)));
    // A different change goes through at once.
    let p = plan(
        &pa(800, Some(requested.clone())),
        Some(Ok(&f)),
        &cfg(),
        &mem,
        at(101),
        wall(),
    );
    assert_eq!(p.resize, Some(vec![("app".into(), MilliCpu(800))]));
    // Still not seen after the settle time (someone put it back): patched again.
    let p = plan(
        &pa(700, Some(requested)),
        Some(Ok(&f)),
        &cfg(),
        &mem,
        at(111),
        wall(),
    );
    assert_eq!(p.resize, Some(vec![("app".into(), MilliCpu(700))]));
}

#[test]
fn its_own_decrease_is_not_judged_on_a_pod_copy_from_before_it() {
    // Patched 200m → 100m at t=100; the allocation's own status write wakes
    // the controller before the pod watch shows the patch. Seen by bench-k8s:
    // the decrease looked held for a cooldown the patch itself started, and
    // the old 200m reported by the kubelet was written as `Applied`.
    let stale = facts(200, 100, Some(200));
    let requested = PodAllocationStatus {
        phase: Phase::Pending,
        reason: Some("ResizeRequested".into()),
        ..Default::default()
    };
    let mem = Memory {
        last_change: Some(at(100)),
        patched: Some(vec![("app".into(), MilliCpu(100))]),
        requested_at: Some(at(100)),
        ..Default::default()
    };
    let p = plan(
        &pa(100, Some(requested.clone())),
        Some(Ok(&stale)),
        &cfg(),
        &mem,
        at(100),
        wall(),
    );
    assert_eq!((p.resize, p.event), (None, None));
    assert_eq!(p.status, requested, "nothing new to write");
    // Once the watch shows the patch and the kubelet's report: Applied.
    let fresh = facts(100, 100, Some(100));
    let p = plan(
        &pa(100, Some(requested)),
        Some(Ok(&fresh)),
        &cfg(),
        &mem,
        at(101),
        wall(),
    );
    assert_eq!(p.status.phase, Phase::Applied);
    assert_eq!(p.status.applied_cpu_limit, Some(CpuQuantity(MilliCpu(100))));
}

#[test]
fn applied_once_the_kubelet_reports_the_limit() {
    let f = facts(700, 250, Some(500));
    let p = plan(
        &pa(700, None),
        Some(Ok(&f)),
        &cfg(),
        &Memory::default(),
        at(0),
        wall(),
    );
    assert_eq!(p.resize, None);
    assert_eq!(p.status.phase, Phase::Pending);
    assert_eq!(p.status.reason.as_deref(), Some("WaitingForKubelet"));
    assert_eq!(p.status.applied_cpu_limit, Some(CpuQuantity(MilliCpu(500))));
    assert!(
        !p.quiet,
        "no resize of this controller's in its grace period: written"
    );
    let f = facts(700, 250, Some(700));
    let p = plan(
        &pa(700, Some(p.status)),
        Some(Ok(&f)),
        &cfg(),
        &Memory::default(),
        at(1),
        wall(),
    );
    assert_eq!(p.status.phase, Phase::Applied);
    assert_eq!(p.event, None, "the kubelet's ResizeCompleted says it");
    assert!(!p.quiet);
    assert_eq!(p.status.conditions[0].status, "True");
    // Once recorded, nothing changes and no event repeats: the status is a fixed point.
    let again = plan(
        &pa(700, Some(p.status.clone())),
        Some(Ok(&f)),
        &cfg(),
        &Memory::default(),
        at(50),
        wall(),
    );
    assert_eq!(again.status, p.status);
    assert_eq!(again.event, None);
    assert_eq!(again.resize, None);
}

#[test]
fn waiting_for_the_kubelet_is_written_only_after_the_grace_period() {
    // Patched 500m → 700m at t=100; the kubelet has not reported it.
    let f = facts(700, 250, Some(500));
    let mem = Memory {
        last_change: Some(at(100)),
        patched: Some(vec![("app".into(), MilliCpu(700))]),
        requested_at: Some(at(100)),
        ..Default::default()
    };
    let p = plan(&pa(700, None), Some(Ok(&f)), &cfg(), &mem, at(103), wall());
    assert_eq!(p.status.reason.as_deref(), Some("WaitingForKubelet"));
    assert!(p.quiet, "3 s after the patch: not news");
    assert_eq!(
        p.requeue,
        Some(at(7)),
        "looked at again when the grace ends"
    );
    let p = plan(&pa(700, None), Some(Ok(&f)), &cfg(), &mem, at(110), wall());
    assert!(!p.quiet, "the grace is over: Pending is written");
    assert_eq!(p.requeue, Some(at(30)));
    // A verdict within the grace period is written at once.
    let mut failing = facts(700, 250, Some(500));
    failing.resize = ResizeState::Infeasible("not enough CPU".into());
    let p = plan(
        &pa(700, None),
        Some(Ok(&failing)),
        &cfg(),
        &mem,
        at(101),
        wall(),
    );
    assert_eq!(p.status.phase, Phase::Failed);
    assert!(!p.quiet);
    assert_eq!(p.event.as_ref().map(|e| e.reason), Some("ResizeFailed"));
}

#[test]
fn kubelet_refusals_are_failures_deferrals_are_pending() {
    let mut f = facts(700, 250, Some(500));
    f.resize = ResizeState::Infeasible("Node didn't have enough capacity".into());
    let p = plan(
        &pa(700, None),
        Some(Ok(&f)),
        &cfg(),
        &Memory::default(),
        at(0),
        wall(),
    );
    assert_eq!(p.status.phase, Phase::Failed);
    assert_eq!(p.status.reason.as_deref(), Some("Infeasible"));
    assert!(p.event.as_ref().is_some_and(|e| e.warning));
    f.resize = ResizeState::Deferred("later".into());
    let p = plan(
        &pa(700, None),
        Some(Ok(&f)),
        &cfg(),
        &Memory::default(),
        at(0),
        wall(),
    );
    assert_eq!(p.status.phase, Phase::Pending);
    assert_eq!(p.status.reason.as_deref(), Some("ResizeDeferred"));
}

#[test]
fn missing_replaced_and_unmanaged_pods_are_never_patched() {
    let p = plan(
        &pa(700, None),
        None,
        &cfg(),
        &Memory::default(),
        at(0),
        wall(),
    );
    assert_eq!(p.status.phase, Phase::Failed);
    assert_eq!(p.status.reason.as_deref(), Some("PodNotFound"));
    assert_eq!(p.resize, None);

    let mut f = facts(500, 250, Some(500));
    f.uid = "uid-2".into();
    let p = plan(
        &pa(700, None),
        Some(Ok(&f)),
        &cfg(),
        &Memory::default(),
        at(0),
        wall(),
    );
    assert_eq!(p.status.reason.as_deref(), Some("PodReplaced"));
    assert_eq!(p.resize, None);

    let mut cfg_ns = cfg();
    cfg_ns.excluded_namespaces.insert("default".into());
    for (mutate, reason) in [
        (
            Box::new(|f: &mut PodFacts| f.qos = QosClass::Guaranteed) as Box<dyn Fn(&mut PodFacts)>,
            "Guaranteed",
        ),
        (Box::new(|f: &mut PodFacts| f.ignored = true), "OptedOut"),
        (
            Box::new(|f: &mut PodFacts| f.containers[0].restart_on_resize = true),
            "RestartContainerPolicy",
        ),
        (
            Box::new(|f: &mut PodFacts| f.containers[0].limit = None),
            "NoCpuLimit",
        ),
        (
            Box::new(|f: &mut PodFacts| f.pod_limit = Some(MilliCpu(800))),
            "PodLevelResources",
        ),
        (
            Box::new(|f: &mut PodFacts| f.pod_request = Some(MilliCpu(300))),
            "PodLevelResources",
        ),
    ] {
        let mut f = facts(500, 250, Some(500));
        mutate(&mut f);
        let p = plan(
            &pa(700, None),
            Some(Ok(&f)),
            &cfg(),
            &Memory::default(),
            at(0),
            wall(),
        );
        assert_eq!(p.status.phase, Phase::Skipped, "{reason}");
        assert_eq!(p.status.reason.as_deref(), Some(reason));
        assert_eq!(p.resize, None, "{reason}");
    }
    let f = facts(500, 250, Some(500));
    let p = plan(
        &pa(700, None),
        Some(Ok(&f)),
        &cfg_ns,
        &Memory::default(),
        at(0),
        wall(),
    );
    assert_eq!(p.status.reason.as_deref(), Some("ExcludedNamespace"));
    assert_eq!(p.resize, None);

    let p = plan(
        &pa(700, None),
        Some(Err("bad quantity".into())),
        &cfg(),
        &Memory::default(),
        at(0),
        wall(),
    );
    assert_eq!(p.status.reason.as_deref(), Some("InvalidPod"));
}

#[test]
fn unknown_containers_are_an_invalid_spec() {
    let f = facts(500, 250, Some(500));
    let mut a = pa(700, None);
    a.spec.containers[0].name = "nope".into();
    let p = plan(&a, Some(Ok(&f)), &cfg(), &Memory::default(), at(0), wall());
    assert_eq!(p.status.phase, Phase::Failed);
    assert_eq!(p.status.reason.as_deref(), Some("InvalidSpec"));
}

#[test]
fn after_a_failure_the_controller_backs_off() {
    let f = facts(500, 250, Some(500));
    let old = PodAllocationStatus {
        phase: Phase::Failed,
        reason: Some("ResizeRejected".into()),
        message: Some("no".into()),
        ..Default::default()
    };
    let mem = Memory {
        failures: 1,
        retry_at: Some(at(160)),
        ..Default::default()
    };
    let p = plan(
        &pa(700, Some(old)),
        Some(Ok(&f)),
        &cfg(),
        &mem,
        at(100),
        wall(),
    );
    assert_eq!(p.resize, None);
    assert_eq!(p.status.phase, Phase::Failed);
    assert_eq!(p.requeue, Some(at(60)));
    let p = plan(&pa(700, None), Some(Ok(&f)), &cfg(), &mem, at(161), wall());
    assert!(p.resize.is_some());
    let c = cfg();
    assert_eq!(c.backoff(1), at(60));
    assert_eq!(c.backoff(2), at(120));
    assert_eq!(c.backoff(30), at(600));
}

#[test]
fn a_stale_allocation_does_not_rerecord_the_original() {
    // The controller recorded 500m and raised the pod to 700m; its copy of the
    // allocation does not show the status yet.
    let f = facts(700, 250, Some(500));
    let mem = Memory {
        original: Some(vec![OriginalLimit {
            name: "app".into(),
            cpu_limit: Some(CpuQuantity(MilliCpu(500))),
        }]),
        last_change: Some(at(1)),
        ..Default::default()
    };
    let p = plan(&pa(700, None), Some(Ok(&f)), &cfg(), &mem, at(2), wall());
    assert_eq!(p.status.original, mem.original.unwrap_or_default());
}

/// Found by `cargo xtask fuzz` (pod_allocation): with a limit under the
/// request (which the API server never admits) the step-up limit asked for
/// less than the request.
/// A resize of the pod by `manager` at `second` (wall clock).
fn resized_by(f: &mut PodFacts, manager: &str, second: i64) {
    f.foreign_resize = Some(crate::k8s::pods::ForeignResize {
        manager: manager.into(),
        at: Timestamp::from_second(second).unwrap(),
        containers: vec!["app".into()],
    });
}

#[test]
fn an_operators_resize_is_adopted_and_held() {
    // MBCAS raised the pod 500 → 800 m; an operator resizes it to 2000 m
    // 10 s before the plan; the allocation still asks 800 m.
    let mut f = facts(2000, 250, Some(2000));
    let changed = wall().as_second() - 10;
    resized_by(&mut f, "kubectl-patch", changed);
    let old = PodAllocationStatus {
        original: vec![OriginalLimit {
            name: "app".into(),
            cpu_limit: Some(CpuQuantity(MilliCpu(500))),
        }],
        phase: Phase::Applied,
        ..Default::default()
    };
    let a = pa(800, Some(old));
    let mem = Memory::default();
    let p = plan(&a, Some(Ok(&f)), &cfg(), &mem, at(100), wall());
    assert_eq!(p.resize, None, "the operator's limit is not patched back");
    assert_eq!(p.status.phase, Phase::Skipped);
    assert_eq!(p.status.reason.as_deref(), Some(REASON_OPERATOR_CHANGE));
    assert_eq!(
        p.status.original,
        vec![OriginalLimit {
            name: "app".into(),
            cpu_limit: Some(CpuQuantity(MilliCpu(2000))),
        }],
        "the operator's limit is the original now"
    );
    let change = p.status.operator_change.clone().unwrap();
    assert_eq!(change.manager, "kubectl-patch");
    assert_eq!(change.changed_at.0.as_second(), changed);
    assert_eq!(change.hold_until.0.as_second(), changed + 30 * 60);
    assert_eq!(
        p.event.as_ref().map(|e| (e.warning, e.reason)),
        Some((false, EVENT_OPERATOR_CHANGE))
    );
    assert_eq!(p.requeue, Some(Duration::from_secs(30 * 60 - 10)));
    // Held: the same change on record is no news, and nothing is patched
    // until the hold ends.
    let a = pa(900, Some(p.status.clone()));
    let later = Timestamp::from_second(changed + 29 * 60).unwrap();
    let held = plan(&a, Some(Ok(&f)), &cfg(), &mem, at(1800), later);
    assert_eq!((held.resize.clone(), held.event.clone()), (None, None));
    assert!(same_record(&held.status, &p.status));
    // Past the hold: managed again, from the adopted original.
    let after = Timestamp::from_second(changed + 30 * 60).unwrap();
    let resumed = plan(&a, Some(Ok(&f)), &cfg(), &mem, at(1900), after);
    assert_eq!(resumed.resize, Some(vec![("app".into(), MilliCpu(900))]));
    assert_eq!(resumed.status.original, p.status.original);
    assert_eq!(resumed.status.operator_change, Some(change.clone()));
    // A second change by the operator is adopted again; an older one by
    // another manager that still owns a limit is not news.
    let mut again = facts(300, 250, Some(300));
    resized_by(&mut again, "kubectl-patch", changed + 3600);
    let p2 = plan(
        &a,
        Some(Ok(&again)),
        &cfg(),
        &mem,
        at(5000),
        Timestamp::from_second(changed + 3601).unwrap(),
    );
    assert_eq!(p2.status.reason.as_deref(), Some(REASON_OPERATOR_CHANGE));
    assert_eq!(
        p2.status.original[0].cpu_limit,
        Some(CpuQuantity(MilliCpu(300)))
    );
    let mut older = facts(900, 250, Some(900));
    resized_by(&mut older, "vpa-updater", changed - 60);
    let p3 = plan(&a, Some(Ok(&older)), &cfg(), &mem, at(1900), after);
    assert_eq!(p3.status.phase, Phase::Applied, "{:?}", p3.status);
}

#[test]
fn with_no_hold_an_operators_resize_is_adopted_and_managed_at_once() {
    let mut f = facts(2000, 250, Some(2000));
    resized_by(&mut f, "kubectl-patch", wall().as_second() - 1);
    let mut c = cfg();
    c.operator_hold = Duration::ZERO;
    let p = plan(
        &pa(800, None),
        Some(Ok(&f)),
        &c,
        &Memory::default(),
        at(0),
        wall(),
    );
    assert_eq!(p.resize, Some(vec![("app".into(), MilliCpu(800))]));
    assert_eq!(
        p.status.original[0].cpu_limit,
        Some(CpuQuantity(MilliCpu(2000)))
    );
    assert!(p.status.operator_change.is_some());
}

#[test]
fn the_step_limit_never_goes_below_the_request() {
    let f = facts(50, 250, None);
    let p = plan(
        &pa(100, None),
        Some(Ok(&f)),
        &cfg(),
        &Memory::default(),
        at(0),
        wall(),
    );
    let changes = p.resize.unwrap_or_default();
    assert!(
        changes.iter().all(|(_, l)| *l >= MilliCpu(250)),
        "{changes:?}"
    );
}

/// Mocked API server (tower-test): the answers a real server cannot easily be
/// made to give (conflicts, throttling, internal errors) and what the
/// controller does with them.
mod mocked {
    use std::sync::{Arc, Mutex};

    use http::{Request, Response, StatusCode};
    use k8s_openapi::api::core::v1::Pod;
    use kube::{
        Client,
        client::Body,
        runtime::{reflector, watcher},
    };

    use super::*;

    /// One request as the mocked server saw it.
    #[derive(Clone, Debug)]
    struct Call {
        method: String,
        path: String,
        query: String,
        content_type: String,
        body: serde_json::Value,
    }

    impl Call {
        /// `METHOD path`, for sequences.
        fn line(&self) -> String {
            format!("{} {}", self.method, self.path)
        }
    }

    type Calls = Arc<Mutex<Vec<Call>>>;

    const STATUS: &str =
        "PATCH /apis/allocation.mbcas.io/v1alpha1/namespaces/default/podallocations/web/status";
    const RESIZE: &str = "PATCH /api/v1/namespaces/default/pods/web/resize";
    const EVENT: &str = "POST /apis/events.k8s.io/v1/namespaces/default/events";

    fn status_body(code: u16, reason: &str) -> Body {
        Body::from(
            serde_json::to_vec(&serde_json::json!({
                "kind": "Status", "apiVersion": "v1", "status": "Failure",
                "message": format!("mocked {code}"), "reason": reason, "code": code}))
            .unwrap_or_default(),
        )
    }

    fn pod_json() -> serde_json::Value {
        serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web", "namespace": "default", "uid": "uid-1"},
            "spec": {"nodeName": "n1", "containers": [{"name": "app", "resources": {
                "requests": {"cpu": "250m"}, "limits": {"cpu": "500m"}}}]},
            "status": {"phase": "Running", "qosClass": "Burstable"}
        })
    }

    /// Serves requests: `resize` answers pop from `resize_codes` (then 200);
    /// everything else succeeds. Every request is recorded as "METHOD path".
    fn server(resize_codes: Vec<u16>) -> (Client, Calls) {
        let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let calls: Calls = Arc::default();
        let rec = calls.clone();
        tokio::spawn(async move {
            use http_body_util::BodyExt as _;
            let mut codes = resize_codes.into_iter();
            while let Some((req, send)) = handle.next_request().await {
                let path = req.uri().path().to_owned();
                let (parts, body) = req.into_parts();
                let bytes = body
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                let call = Call {
                    method: parts.method.to_string(),
                    path: path.clone(),
                    query: parts.uri.query().unwrap_or_default().to_owned(),
                    content_type: parts
                        .headers
                        .get(http::header::CONTENT_TYPE)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned(),
                    body: serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
                };
                if let Ok(mut c) = rec.lock() {
                    c.push(call);
                }
                let resp = if path.ends_with("/resize") {
                    match codes.next() {
                        Some(code) if code != 200 => Response::builder()
                            .status(
                                StatusCode::from_u16(code)
                                    .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                            )
                            .body(status_body(code, "Mocked")),
                        _ => Response::builder().body(Body::from(
                            serde_json::to_vec(&pod_json()).unwrap_or_default(),
                        )),
                    }
                } else if path.contains("/podallocations/") {
                    let mut pa = serde_json::to_value(super::pa(700, None)).unwrap_or_default();
                    pa["apiVersion"] = "allocation.mbcas.io/v1alpha1".into();
                    pa["kind"] = "PodAllocation".into();
                    Response::builder()
                        .body(Body::from(serde_json::to_vec(&pa).unwrap_or_default()))
                } else {
                    // Events: echo an empty object.
                    Response::builder()
                        .status(StatusCode::CREATED)
                        .body(Body::from(b"{\"metadata\":{}}".to_vec()))
                };
                send.send_response(resp.unwrap());
            }
        });
        (Client::new(svc, "default"), calls)
    }

    fn context(client: Client) -> Arc<Context> {
        let (store, mut writer) = reflector::store::<Pod>();
        let pod: Pod = serde_json::from_value(pod_json()).unwrap();
        writer.apply_watcher_event(&watcher::Event::Apply(pod));
        Arc::new(Context::new(client, store, cfg(), None))
    }

    /// The pod after the kubelet applied `millicores`: spec and status agree.
    fn resized_pod(millicores: u64) -> Pod {
        let mut p = pod_json();
        let limit = format!("{millicores}m");
        p["spec"]["containers"][0]["resources"]["limits"]["cpu"] = limit.clone().into();
        p["status"]["containerStatuses"] = serde_json::json!([{
            "name": "app", "image": "x", "imageID": "", "ready": true, "restartCount": 0,
            "resources": {"requests": {"cpu": "250m"}, "limits": {"cpu": limit}}}]);
        serde_json::from_value(p).unwrap()
    }

    fn taken(calls: &Calls) -> Vec<Call> {
        calls.lock().map(|c| c.clone()).unwrap_or_default()
    }

    fn lines(calls: &[Call]) -> Vec<String> {
        calls.iter().map(Call::line).collect()
    }

    /// A status write as the controller must send it: server-side apply on the
    /// status subresource, forced, with its own field manager.
    fn assert_status_apply(c: &Call, phase: &str, reason: &str) {
        assert_eq!(c.line(), STATUS);
        assert_eq!(c.content_type, "application/apply-patch+yaml", "{c:?}");
        assert!(c.query.contains("fieldManager=mbcas-daemon"), "{c:?}");
        assert!(c.query.contains("force=true"), "{c:?}");
        assert_eq!(c.body["kind"], "PodAllocation", "{c:?}");
        assert_eq!(c.body["status"]["phase"], phase, "{c:?}");
        assert_eq!(c.body["status"]["reason"], reason, "{c:?}");
        assert_eq!(
            c.body["status"]["original"],
            serde_json::json!([{"name": "app", "cpuLimit": "500m"}]),
            "the original limit is on record in every status write: {c:?}"
        );
    }

    /// The resize: a strategic-merge patch of the CPU limit only.
    fn assert_resize(c: &Call, millicores: u64) {
        assert_eq!(c.line(), RESIZE);
        assert_eq!(
            c.content_type, "application/strategic-merge-patch+json",
            "{c:?}"
        );
        assert_eq!(
            c.body,
            serde_json::json!({"spec": {"containers": [{"name": "app", "resources": {
                "limits": {"cpu": format!("{millicores}m")}}}]}}),
            "only the CPU limit is patched: {c:?}"
        );
    }

    fn assert_event(c: &Call, type_: &str, reason: &str) {
        assert_eq!(c.line(), EVENT);
        assert_eq!(c.body["type"], type_, "{c:?}");
        assert_eq!(c.body["reason"], reason, "{c:?}");
        assert_eq!(c.body["regarding"]["kind"], "Pod", "{c:?}");
        assert_eq!(c.body["regarding"]["name"], "web", "{c:?}");
        assert_eq!(c.body["regarding"]["uid"], "uid-1", "{c:?}");
    }

    #[tokio::test]
    async fn conflicts_are_retried_at_once() {
        let (client, calls) = server(vec![409, 409]);
        let ctx = context(client);
        let out = reconcile(Arc::new(pa(700, None)), ctx.clone()).await;
        assert!(out.is_ok(), "{out:?}");
        let c = taken(&calls);
        assert_eq!(
            lines(&c),
            [STATUS, RESIZE, RESIZE, RESIZE],
            "original on record, two conflicts retried at once, no event"
        );
        assert_status_apply(&c[0], "Pending", "ResizeRequested");
        for r in &c[1..4] {
            assert_resize(r, 700);
        }
        let mem = ctx.memory(&ObjectRef::new("web").within("default"), "uid-1");
        assert_eq!(mem.failures, 0);
        assert!(mem.last_change.is_some());
    }

    /// A resize of a pod whose original is on record, which the kubelet
    /// carries out promptly: the PATCH and one status write, no event.
    #[tokio::test]
    async fn a_prompt_resize_costs_one_patch_and_one_status_write() {
        let (client, calls) = server(vec![]);
        let (store, mut writer) = reflector::store::<Pod>();
        writer.apply_watcher_event(&watcher::Event::Apply(resized_pod(500)));
        let ctx = Arc::new(Context::new(client, store, cfg(), None));
        let recorded = PodAllocationStatus {
            original: vec![OriginalLimit {
                name: "app".into(),
                cpu_limit: Some(CpuQuantity(MilliCpu(500))),
            }],
            phase: Phase::Applied,
            reason: Some("ResizeApplied".into()),
            ..Default::default()
        };
        let pa = pa(700, Some(recorded));
        let action = reconcile(Arc::new(pa.clone()), ctx.clone()).await;
        assert_eq!(action.ok(), Some(Action::requeue(Duration::from_secs(10))));
        let c = taken(&calls);
        assert_eq!(lines(&c), [RESIZE], "the request itself is not written");
        assert_resize(&c[0], 700);
        // The pod watch shows the kubelet's report: Applied, written once.
        writer.apply_watcher_event(&watcher::Event::Apply(resized_pod(700)));
        let out = reconcile(Arc::new(pa.clone()), ctx.clone()).await;
        assert!(out.is_ok(), "{out:?}");
        let c = taken(&calls);
        assert_eq!(lines(&c[1..]), [STATUS], "one status write, no event");
        assert_status_apply(&c[1], "Applied", "ResizeApplied");
        assert_eq!(c[1].body["status"]["appliedCpuLimit"], "700m", "{:?}", c[1]);
        // A copy of the allocation older than that write (the watch lags the
        // controller's own writes) plans the same status: not written again.
        let out = reconcile(Arc::new(pa.clone()), ctx.clone()).await;
        assert!(out.is_ok(), "{out:?}");
        assert_eq!(taken(&calls).len(), 2, "a stale copy costs no write");
        // With that status stored, nothing more is written.
        let mut stored = pa;
        stored.status = serde_json::from_value(c[1].body["status"].clone()).ok();
        let out = reconcile(Arc::new(stored), ctx.clone()).await;
        assert!(out.is_ok(), "{out:?}");
        assert_eq!(taken(&calls).len(), 2, "a fixed point: no further request");
    }

    /// The first resize of a pod whose allocation carries the originals in
    /// its spec (the node daemon's): no status write before the PATCH, and the
    /// originals copied into the one status write that follows.
    #[tokio::test]
    async fn a_first_resize_with_the_originals_in_the_spec_costs_one_status_write() {
        let (client, calls) = server(vec![]);
        let (store, mut writer) = reflector::store::<Pod>();
        writer.apply_watcher_event(&watcher::Event::Apply(resized_pod(500)));
        let ctx = Arc::new(Context::new(client, store, cfg(), None));
        let original = vec![OriginalLimit {
            name: "app".into(),
            cpu_limit: Some(CpuQuantity(MilliCpu(500))),
        }];
        let mut pa = pa(700, None);
        pa.spec.original = original.clone();
        let out = reconcile(Arc::new(pa.clone()), ctx.clone()).await;
        assert!(out.is_ok(), "{out:?}");
        let c = taken(&calls);
        assert_eq!(lines(&c), [RESIZE], "no status write before the PATCH");
        writer.apply_watcher_event(&watcher::Event::Apply(resized_pod(700)));
        let out = reconcile(Arc::new(pa), ctx.clone()).await;
        assert!(out.is_ok(), "{out:?}");
        let c = taken(&calls);
        assert_eq!(lines(&c[1..]), [STATUS]);
        assert_status_apply(&c[1], "Applied", "ResizeApplied");
        assert_eq!(
            c[1].body["status"]["original"],
            serde_json::json!([{"name": "app", "cpuLimit": "500m"}]),
            "{:?}",
            c[1]
        );
    }

    /// An operator's resize adopted with no hold: the status with the new
    /// original goes first, then the resize, and the Event says so (once).
    #[tokio::test]
    async fn an_operators_resize_adopted_without_a_hold_is_told_once() {
        let (client, calls) = server(vec![]);
        let (store, mut writer) = reflector::store::<Pod>();
        let mut pod = resized_pod(2000);
        pod.metadata.managed_fields = Some(
            serde_json::from_value(serde_json::json!([{
                "manager": "kubectl-patch", "operation": "Update", "subresource": "resize",
                "apiVersion": "v1", "time": "2026-12-07T05:00:00Z", "fieldsType": "FieldsV1",
                "fieldsV1": {"f:spec": {"f:containers": {"k:{\"name\":\"app\"}":
                    {"f:resources": {"f:limits": {"f:cpu": {}}}}}}}
            }]))
            .unwrap(),
        );
        writer.apply_watcher_event(&watcher::Event::Apply(pod));
        let mut c = cfg();
        c.operator_hold = Duration::ZERO;
        let ctx = Arc::new(Context::new(client, store, c, None));
        let mut pa = pa(700, None);
        pa.spec.original = vec![OriginalLimit {
            name: "app".into(),
            cpu_limit: Some(CpuQuantity(MilliCpu(500))),
        }];
        let out = reconcile(Arc::new(pa), ctx).await;
        assert!(out.is_ok(), "{out:?}");
        let c = taken(&calls);
        assert_eq!(lines(&c), [STATUS, RESIZE, EVENT]);
        assert_eq!(
            c[0].body["status"]["original"],
            serde_json::json!([{"name": "app", "cpuLimit": "2000m"}]),
            "the operator's limit is on record before the resize: {:?}",
            c[0]
        );
        assert_eq!(
            c[0].body["status"]["operatorChange"]["manager"],
            "kubectl-patch"
        );
        assert_resize(&c[1], 700);
        assert_event(&c[2], "Normal", EVENT_OPERATOR_CHANGE);
    }

    #[tokio::test]
    async fn refusals_fail_the_allocation_and_back_off() {
        let (client, calls) = server(vec![422]);
        let ctx = context(client);
        let action = reconcile(Arc::new(pa(700, None)), ctx.clone())
            .await
            .unwrap();
        assert_eq!(action, Action::requeue(Duration::from_secs(60)));
        let c = taken(&calls);
        assert_eq!(
            lines(&c),
            [STATUS, RESIZE, STATUS, EVENT],
            "a refusal is not retried at once; it is recorded and told"
        );
        assert_status_apply(&c[0], "Pending", "ResizeRequested");
        assert_resize(&c[1], 700);
        assert_status_apply(&c[2], "Failed", "ResizeRejected");
        assert_eq!(
            c[2].body["status"]["conditions"][0]["status"], "False",
            "{:?}",
            c[2]
        );
        assert_event(&c[3], "Warning", "ResizeFailed");
        let mem = ctx.memory(&ObjectRef::new("web").within("default"), "uid-1");
        assert_eq!(mem.failures, 1);
        // A pod recreated under the same name (a StatefulSet's) is another
        // pod: it inherits neither the failure nor the backoff.
        let other = ctx.memory(&ObjectRef::new("web").within("default"), "uid-2");
        assert_eq!((other.failures, other.retry_at), (0, None));
        assert_eq!(other.pod_uid, "uid-2");
        // Within the backoff the next reconcile does not patch again.
        let failed = PodAllocationStatus {
            phase: Phase::Failed,
            reason: Some("ResizeRejected".into()),
            ..Default::default()
        };
        let again = reconcile(Arc::new(pa(700, Some(failed))), ctx.clone()).await;
        assert!(again.is_ok(), "{again:?}");
        let c = taken(&calls);
        assert_eq!(
            lines(&c[4..]),
            [STATUS],
            "within the backoff: the failure kept on record, no patch"
        );
        assert_status_apply(&c[4], "Failed", "ResizeRejected");
    }

    #[tokio::test]
    async fn server_errors_and_throttling_are_retried_after_the_backoff() {
        for code in [500, 429, 503] {
            let (client, calls) = server(vec![code, code, code, code]);
            let ctx = context(client);
            let pa = Arc::new(pa(700, None));
            let err = reconcile(pa.clone(), ctx.clone()).await;
            assert!(
                matches!(err, Err(ResizeError::Resize { .. })),
                "{code}: {err:?}"
            );
            let c = taken(&calls);
            assert_eq!(
                lines(&c),
                [STATUS, RESIZE],
                "{code}: original on record, one patch, no retry without backoff"
            );
            assert_resize(&c[1], 700);
            let Err(e) = err else { continue };
            let action = error_policy(pa, &e, ctx.clone());
            assert_eq!(action, Action::requeue(Duration::from_secs(60)), "{code}");
        }
    }
}
