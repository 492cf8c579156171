use super::*;

const SEC: u64 = 1_000_000_000;

/// One second of a consumer whose runnable threads want `demand` millicores under
/// `limit` millicores, as CFS would report it: usage is capped by the limit and the
/// held-back runnable time shows up as throttled time. `overestimate` adds
/// throttled time that the threads would in fact have slept (the model's upper bias).
fn window(demand: f64, limit: f64, overestimate: f64) -> Sample {
    let usage = demand.min(limit);
    let throttled = if demand > limit {
        demand - limit + overestimate
    } else {
        0.0
    };
    Sample {
        window_ns: SEC,
        usage_ns: (usage * 1e6) as u64,
        throttled_ns: (throttled * 1e6) as u64,
        nr_periods: 10,
        nr_throttled: if demand > limit { 10 } else { 0 },
        psi_some_ns: None,
    }
}

fn cfg() -> DemandConfig {
    DemandConfig::default()
}

#[test]
fn step_up_is_fast() {
    let mut e = DemandEstimator::new();
    for _ in 0..5 {
        e.update(&window(200.0, 4000.0, 0.0), &cfg());
    }
    let mut n = 0;
    loop {
        n += 1;
        let est = e.update(&window(1000.0, 4000.0, 0.0), &cfg());
        if est.smoothed >= 900.0 {
            break;
        }
        assert!(n < 10, "step up took more than 10 samples: {est:?}");
    }
    assert!(n <= 7, "90 % of a step up within 7 samples, took {n}");
}

#[test]
fn step_down_is_slow() {
    let mut e = DemandEstimator::new();
    e.update(&window(1000.0, 4000.0, 0.0), &cfg());
    let mut est = None;
    for _ in 0..5 {
        est = Some(e.update(&window(200.0, 4000.0, 0.0), &cfg()));
    }
    let after5 = est.map(|e| e.smoothed).unwrap_or_default();
    assert!(
        after5 > 600.0,
        "a step down is not followed within 5 samples, got {after5}"
    );
    for _ in 0..40 {
        est = Some(e.update(&window(200.0, 4000.0, 0.0), &cfg()));
    }
    let settled = est.map(|e| e.smoothed).unwrap_or_default();
    assert!(
        (settled - 200.0).abs() < 10.0,
        "settles near 200, got {settled}"
    );
}

#[test]
fn bursty_on_off_keeps_need_above_mean() {
    let mut e = DemandEstimator::new();
    let mut last = None;
    for i in 0..60 {
        let d = if i % 2 == 0 { 1000.0 } else { 0.0 };
        last = Some(e.update(&window(d, 4000.0, 0.0), &cfg()));
    }
    let last = last.unwrap_or_else(|| panic!("no estimate"));
    // Fast-up / slow-down keeps the estimate in the upper part of the range.
    assert!(last.smoothed > 600.0 && last.smoothed < 1000.0, "{last:?}");
    assert!(last.need.0 as f64 >= 1.2 * 600.0);
}

#[test]
fn throttled_demand_is_discovered_by_raising_the_limit() {
    // True demand 600 m, starting limit 200 m; throttling over-reports by 300 m.
    let mut e = DemandEstimator::new();
    let mut limit = 200.0;
    let mut history = Vec::new();
    for _ in 0..60 {
        let est = e.update(&window(600.0, limit, 300.0), &cfg());
        // Closed loop: the limit follows the need (what the market would grant on
        // an uncontended node with `surplus = hold`).
        limit = est.need.0 as f64;
        history.push(est);
    }
    // The first window already shows more than the limit.
    assert!(history[0].raw > 600.0);
    // Once the limit exceeds the demand, throttling stops and the estimate falls to
    // the true demand: the need converges to 600 × 1.2 within 15 %.
    let need = history.last().map(|e| e.need.0 as f64).unwrap_or_default();
    assert!((need - 720.0).abs() <= 0.15 * 720.0, "need {need}");
    assert_eq!(history.last().map(|e| e.throttled_ratio), Some(0.0));
}

#[test]
fn headroom_and_rounding() {
    let mut e = DemandEstimator::new();
    let est = e.update(&window(500.0, 4000.0, 0.0), &cfg());
    assert_eq!(est.need, MilliCpu(600));
    let no_headroom = DemandConfig {
        headroom: 0.0,
        ..cfg()
    };
    let est = DemandEstimator::new().update(&window(333.3, 4000.0, 0.0), &no_headroom);
    assert_eq!(est.need, MilliCpu(334));
}

#[test]
fn psi_bounds_held_back_time_when_throttled() {
    let mut s = window(1000.0, 200.0, 0.0);
    s.throttled_ns = 100 * 1_000_000;
    s.psi_some_ns = Some(800 * 1_000_000);
    assert!((s.raw_demand_millicores() - 1000.0).abs() < 1e-6);
    // Without throttling, pressure (contention for CPUs, not the limit) is ignored.
    let mut idle = window(300.0, 4000.0, 0.0);
    idle.psi_some_ns = Some(500 * 1_000_000);
    assert!((idle.raw_demand_millicores() - 300.0).abs() < 1e-6);
}

#[test]
fn samples_from_counters() {
    let a = Counters {
        at_ns: SEC,
        usage_ns: 10,
        throttled_ns: 0,
        nr_periods: 5,
        nr_throttled: 1,
        psi_some_ns: Some(7),
    };
    let b = Counters {
        at_ns: 2 * SEC,
        usage_ns: 500_000_010,
        throttled_ns: 100,
        nr_periods: 15,
        nr_throttled: 6,
        psi_some_ns: Some(9),
    };
    let s = Sample::new(&a, &b).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(s.window_ns, SEC);
    assert_eq!(s.nr_periods, 10);
    assert_eq!(s.nr_throttled, 5);
    assert_eq!(s.psi_some_ns, Some(2));
    assert!((s.usage_millicores() - 500.0).abs() < 1e-9);
    assert!((s.throttled_ratio() - 0.5).abs() < 1e-12);
    assert_eq!(
        Sample::new(&b, &a)
            .err()
            .map(|e| matches!(e, DemandError::CounterReset { .. })),
        Some(true)
    );
    assert_eq!(Sample::new(&a, &a), Err(DemandError::EmptyWindow));
}

#[test]
fn config_validation_names_the_field() {
    let bad = DemandConfig {
        alpha_up: 0.0,
        ..cfg()
    };
    let msg = bad
        .validate()
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(msg.contains("alpha_up"), "{msg}");
    assert!(
        DemandConfig {
            headroom: -0.1,
            ..cfg()
        }
        .validate()
        .is_err()
    );
    assert!(cfg().validate().is_ok());
}

#[test]
fn pod_need_sums_containers() {
    assert_eq!(pod_need(&[MilliCpu(100), MilliCpu(250)]), MilliCpu(350));
    assert_eq!(pod_need(&[]), MilliCpu(0));
}
