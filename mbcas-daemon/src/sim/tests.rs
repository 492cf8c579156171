use super::{scenario::Scenario, *};

fn scenario(json: &str) -> Scenario {
    Scenario::parse(json, "test").unwrap()
}

#[test]
fn one_pod_quota_20_demand_100_throttles_every_period() {
    let s = scenario(
        r#"{"name": "one", "duration_s": 10, "nodes": [{"name": "n", "capacity_m": 2000,
            "pods": [{"name": "p", "request_m": 100, "limit_m": 200, "demand": {"kind": "steady", "m": 1000}}]}]}"#,
    );
    let m = run_policy(&s, "static", 1).expect("policy");
    assert_eq!(m.throttled_ratio_p50, 1.0);
    // Usage is the quota, 20 % of the node: Σ limits − Σ usage = 0.
    assert!(m.slack_pct.abs() < 1e-9, "{m:?}");
    // 800 m unmet for 10 s.
    assert!((m.unmet_core_seconds - 8.0).abs() < 1e-6, "{m:?}");
    assert_eq!(m.resizes_per_pod_hour, 0.0);
}

#[test]
fn mbcas_removes_throttling_a_static_limit_causes() {
    let s = scenario(
        r#"{"name": "one", "duration_s": 60, "nodes": [{"name": "n", "capacity_m": 4000,
            "pods": [{"name": "p", "request_m": 100, "limit_m": 200, "demand": {"kind": "steady", "m": 1000}}]}]}"#,
    );
    let st = run_policy(&s, "static", 1).expect("static");
    let mb = run_policy(&s, "mbcas", 1).expect("mbcas");
    assert!(mb.throttled_ratio_p50 < 0.2, "{mb:?}");
    assert!(
        mb.unmet_core_seconds < st.unmet_core_seconds / 5.0,
        "{mb:?} vs {st:?}"
    );
}

#[test]
fn deterministic_for_a_seed() {
    let s = scenario(
        r#"{"name": "noisy", "duration_s": 30, "nodes": [{"name": "n", "capacity_m": 2000,
            "pods": [{"name": "p", "count": 3, "request_m": 200, "limit_m": 400, "noise": 0.3, "demand": {"kind": "steady", "m": 700}}]}]}"#,
    );
    let a = simulate(&s, &[], 7);
    let b = simulate(&s, &[], 7);
    assert_eq!(a.policies, b.policies);
    let c = simulate(&s, &[], 8);
    assert_ne!(a.policies.get("static"), c.policies.get("static"));
    assert_eq!(a.policies.len(), policies::ALL.len());
}

#[test]
fn outputs_render() {
    let s = scenario(
        r#"{"name": "o", "duration_s": 5, "nodes": [{"name": "n", "capacity_m": 1000,
            "pods": [{"name": "p", "request_m": 100, "limit_m": 200, "demand": {"kind": "steady", "m": 300}}]}]}"#,
    );
    let sum = simulate(&s, &["static".into(), "mbcas".into()], 1);
    let md = markdown(&sum);
    assert!(
        md.contains("| static |") && md.contains("| mbcas |"),
        "{md}"
    );
    let prom = prometheus(&sum);
    assert!(
        prom.contains("mbcas_sim_throttled_ratio_p99{scenario=\"o\",policy=\"static\"} 1"),
        "{prom}"
    );
}

#[test]
fn threads_do_not_change_results() {
    let s = scenario(
        r#"{"name": "many", "duration_s": 20, "nodes": [{"name": "n", "count": 5, "capacity_m": 1000,
            "pods": [{"name": "p", "count": 3, "request_m": 200, "limit_m": 300, "noise": 0.3, "demand": {"kind": "steady", "m": 400}}]}]}"#,
    );
    let run = |threads| {
        let mut seen = 0;
        let mut count = |n: u64| seen += n;
        let r = run_policy_with(
            &s,
            "mbcas",
            3,
            RunOptions {
                trace_pods: 1,
                progress: Some(&mut count),
                threads,
            },
        )
        .expect("mbcas");
        (r, seen)
    };
    let (one, seen1) = run(1);
    let (three, seen3) = run(3);
    assert_eq!(one, three);
    assert_eq!((seen1, seen3), (work(&s), work(&s)), "progress adds up");
    assert_eq!(one.metrics.pods, 15);
    assert_eq!(one.traces.len(), 1);
    assert_eq!(one.traces[0].demand_m.len(), 20, "one point a second");
}

#[test]
fn request_latency_is_reported_per_pod_and_a_tight_quota_delays_bursts() {
    // `burst`: 8 requests of 5 ms at once every second on 8 threads: 40 ms of CPU
    // in one period. With a 100 m limit (10 ms a period) the batch takes 4
    // periods; with no limit it is done in 5 ms. `steady`: 1 ms requests.
    let s = scenario(
        r#"{"name": "req", "duration_s": 20, "nodes": [{"name": "n", "capacity_m": 4000,
            "pods": [
              {"name": "burst", "request_m": 100, "limit_m": 100, "demand": {"kind": "steady", "m": 0},
               "requests": {"rate_per_s": 0, "cpu_ms": 5, "threads": 8, "burst_every_s": 1, "burst_n": 8}},
              {"name": "steady", "request_m": 100, "limit_m": 1000, "demand": {"kind": "steady", "m": 0},
               "requests": {"rate_per_s": 50, "cpu_ms": 1, "threads": 2}}]}]}"#,
    );
    let st = run_policy(&s, "static", 1).expect("static");
    let nl = run_policy(&s, "nolimits", 1).expect("nolimits");
    let per = |m: &PolicyMetrics, pod: &str| {
        m.latency_by_pod
            .get(pod)
            .cloned()
            .unwrap_or_else(|| panic!("{pod} missing: {m:?}"))
    };
    for m in [&st, &nl] {
        let total: u64 = m.latency_by_pod.values().map(|l| l.requests).sum();
        assert_eq!(total, m.requests, "{m:?}");
        // 20 batches of 8; the last may still be in flight when the run ends.
        let n = per(m, "burst").requests;
        assert!((19 * 8..=20 * 8).contains(&n), "{n}: {m:?}");
    }
    // No limit: each burst request runs on its own thread for 5 ms.
    assert!((per(&nl, "burst").p99_ms - 5.0).abs() < 1e-6, "{nl:?}");
    // 100 m: the last of each batch finishes in the fourth period, more than
    // 200 ms after it arrived (the batch arrives somewhere in its period).
    assert!(per(&st, "burst").p99_ms > 200.0, "{st:?}");
    assert!(per(&st, "burst").p99_ms < 400.0, "{st:?}");
    assert!(per(&st, "steady").p99_ms < 5.0, "{st:?}");
}

#[test]
fn psi_some_is_the_share_of_wanted_cpu_time_not_run() {
    // Quota 200 m, demand 1000 m: each period runs 20 ms and is stalled for the
    // other 80 % of its wanted time.
    let s = scenario(
        r#"{"name": "psi", "duration_s": 10, "nodes": [{"name": "n", "capacity_m": 2000,
            "pods": [{"name": "p", "request_m": 100, "limit_m": 200, "demand": {"kind": "steady", "m": 1000}}]}]}"#,
    );
    let m = run_policy(&s, "static", 1).expect("static");
    assert!((m.psi_some_pct - 80.0).abs() < 1e-6, "{m:?}");
    // avg10 after five 2 s updates of 80 %: 0.8 × (1 − e^(−2/10·5)) = 50.57 %,
    // the largest of the samples (the p99 of five).
    let want = 80.0 * (1.0 - (-1.0f64).exp());
    assert!((m.psi_some_avg10_p99 - want).abs() < 0.1, "{m:?} vs {want}");
    // Two pods of 1000 m on a 1000 m node, no limits: each runs half the time.
    let s = scenario(
        r#"{"name": "rq", "duration_s": 10, "nodes": [{"name": "n", "capacity_m": 1000,
            "pods": [{"name": "p", "count": 2, "request_m": 100, "demand": {"kind": "steady", "m": 1000}}]}]}"#,
    );
    let m = run_policy(&s, "nolimits", 1).expect("nolimits");
    assert!((m.psi_some_pct - 50.0).abs() < 1e-6, "{m:?}");
    assert!((m.cpu_util_node_pct - 100.0).abs() < 1e-6, "{m:?}");
    // 1000 m used of 200 m requested.
    assert!((m.cpu_util_requested_pct - 500.0).abs() < 1e-6, "{m:?}");
    // Under its quota: no pressure.
    let s = scenario(
        r#"{"name": "ok", "duration_s": 10, "nodes": [{"name": "n", "capacity_m": 2000,
            "pods": [{"name": "p", "request_m": 100, "limit_m": 500, "demand": {"kind": "steady", "m": 400}}]}]}"#,
    );
    let m = run_policy(&s, "static", 1).expect("static");
    assert_eq!((m.psi_some_pct, m.psi_some_avg10_p99), (0.0, 0.0), "{m:?}");
    assert!((m.cpu_util_node_pct - 20.0).abs() < 1e-6, "{m:?}");
}

/// One service of 1 replica (request = limit = 1000 m) on a 2500 m node whose
/// load steps from 700 m to 2000 m at 30 s; replicas start in 20 s.
const SERVICE: &str = r#"{"name": "svc", "duration_s": 120, "nodes": [{"name": "n", "capacity_m": 2500,
    "services": [{"name": "s", "replicas": {"min": 1, "max": 4}, "request_m": 1000, "limit_m": 1000,
      "startup_s": 20, "load": {"kind": "steps", "points": [[0, 700], [30, 2000]]}}]}]}"#;

#[test]
fn hpa_replicas_start_late_and_wait_pending_for_room() {
    let s = scenario(SERVICE);
    let m = run_policy(&s, "hpa", 1).expect("hpa");
    // Syncs at 15 and 30 s see 70 %; the one at 45 s sees 100 % (the limit):
    // ⌈1.43⌉ = 2; the second replica serves from 65 s: 35 s after the step.
    assert_eq!((m.reaction_p50_s, m.reaction_censored), (35.0, 0), "{m:?}");
    // At 75 s two replicas at 100 % ask for 3; the third's request does not
    // fit (3 × 1000 m > 2500 m): it stays Pending.
    assert_eq!((m.scale_events, m.pending_replicas), (2, 1), "{m:?}");
    // 1 replica until 65 s, 2 after.
    assert!(
        (m.replicas_mean - (65.0 + 2.0 * 55.0) / 120.0).abs() < 1e-6,
        "{m:?}"
    );
    // The load no replica served: none (one is always ready), but 300 m was
    // throttled from 30 to 65 s.
    assert!((m.throttled_core_seconds - 35.0).abs() < 0.5, "{m:?}");
    // Static limits never catch up; MBCAS raises the one replica's limit.
    let st = run_policy(&s, "static", 1).expect("static");
    assert_eq!((st.reaction_censored, st.scale_events), (1, 0), "{st:?}");
    let mb = run_policy(&s, "mbcas", 1).expect("mbcas");
    assert_eq!(mb.reaction_censored, 0, "{mb:?}");
    assert!(mb.reaction_p50_s <= 3.0, "{mb:?}");
}

#[test]
fn a_steps_load_changes_at_its_points() {
    let d = scenario::Demand::Steps {
        points: vec![(0.0, 700.0), (30.0, 2000.0), (60.0, 100.0)],
    };
    assert_eq!(
        (d.at(0.0), d.at(29.9), d.at(30.0), d.at(99.0)),
        (700.0, 700.0, 2000.0, 100.0)
    );
    assert_eq!(
        (d.next_change(0.0), d.next_change(30.0), d.next_change(61.0)),
        (30.0, 60.0, f64::INFINITY)
    );
    assert_eq!(d.steps(50.0), vec![30.0]);
    let bad = SERVICE.replace("[30, 2000]", "[0, 2000]");
    let e = Scenario::parse(&bad, "b.json")
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        e.contains("services[0].load") && e.contains("increase"),
        "{e}"
    );
    let bad = SERVICE.replace("\"max\": 4", "\"max\": 0");
    let e = Scenario::parse(&bad, "b.json")
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("services[0].replicas"), "{e}");
}
