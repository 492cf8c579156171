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
