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
        wait_ns: None,
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
    let last = last.expect("no estimate");
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
    // 5 % of 500 m.
    let est = e.update(&window(500.0, 4000.0, 0.0), &cfg());
    assert_eq!(est.need, MilliCpu(530));
    let no_headroom = DemandConfig {
        headroom: 0.0,
        ..cfg()
    };
    // At least 10 m of headroom, rounded up to the market's quantum, never down.
    let est = DemandEstimator::new().update(&window(333.3, 4000.0, 0.0), &no_headroom);
    assert_eq!(est.need, MilliCpu(350));
    let est = DemandEstimator::new().update(&window(137.5, 4000.0, 0.0), &cfg());
    assert_eq!(est.need, MilliCpu(150));
}

#[test]
fn variable_demand_carries_its_deviation_and_peak_as_headroom() {
    let mut e = DemandEstimator::new();
    let mut last = None;
    for i in 0..60 {
        let d = if i % 2 == 0 { 300.0 } else { 700.0 };
        last = Some(e.update(&window(d, 4000.0, 0.0), &cfg()));
    }
    let est = last.expect("no estimate");
    // The estimate sits between the two levels (nearer the top: it rises fast
    // and falls slowly), so the deviation is 200–330 m.
    assert!(est.deviation > 150.0 && est.deviation < 350.0, "{est:?}");
    assert!(
        est.need.0 as f64 >= est.smoothed + 2.0 * est.deviation - 1e-6,
        "{est:?}"
    );
    assert!(est.need.0 as f64 >= est.peak, "{est:?}");
    // A steady load has no deviation and keeps the small headroom.
    let mut steady = DemandEstimator::new();
    for _ in 0..30 {
        last = Some(steady.update(&window(500.0, 4000.0, 0.0), &cfg()));
    }
    let est = last.expect("no estimate");
    assert!(est.deviation < 1.0, "{est:?}");
    assert_eq!(est.need, MilliCpu(530));
}

#[test]
fn throttling_raises_the_need_above_the_limit_and_is_remembered() {
    let mut m = ThrottleMemory::default();
    // 15 % of periods throttled under 400 m: at least 400 × 1.3 = 520 m.
    m.update(MilliCpu(400), 100, 15, 0.05, 1.0);
    assert_eq!(m.need(MilliCpu(380)), MilliCpu(520));
    assert_eq!(m.need(MilliCpu(900)), MilliCpu(900), "a larger need stands");
    // Quiet windows: the level decays with a half-life of 30 minutes.
    for _ in 0..1800 {
        m.update(MilliCpu(520), 10, 0, 0.05, 1.0);
    }
    assert_eq!(m.need(MilliCpu(0)), MilliCpu(260));
    // Under the target, nothing is learnt; fully throttled: twice the limit.
    let mut m = ThrottleMemory::default();
    m.update(MilliCpu(400), 100, 4, 0.05, 1.0);
    assert_eq!(m.need(MilliCpu(10)), MilliCpu(10));
    m.update(MilliCpu(400), 10, 10, 0.05, 1.0);
    assert_eq!(m.need(MilliCpu(0)), MilliCpu(800));
    // A window of no known length decays nothing; its periods still count.
    let mut m = ThrottleMemory::default();
    m.update(MilliCpu(400), 10, 10, 0.05, f64::NAN);
    assert_eq!(m.need(MilliCpu(10)), MilliCpu(800));
    // More throttled periods than periods (a torn read) count as all.
    let mut m = ThrottleMemory::default();
    m.update(MilliCpu(400), 10, 50, 0.05, 1.0);
    assert_eq!(m.need(MilliCpu(10)), MilliCpu(800));
}

#[test]
fn one_throttled_period_in_a_short_window_is_judged_over_ten() {
    // An idle pod's 200 ms window: 2 periods, 1 throttled. Alone it read as a
    // ratio of 0.5 and doubled the need; judged over 10 periods it is 1 in 10.
    let mut m = ThrottleMemory::default();
    m.update(MilliCpu(100), 2, 1, 0.05, 0.2);
    assert_eq!(m.need(MilliCpu(20)), MilliCpu(20), "not judged yet");
    for _ in 0..4 {
        m.update(MilliCpu(100), 2, 0, 0.05, 0.2);
    }
    assert_eq!(
        m.need(MilliCpu(20)),
        MilliCpu(120),
        "1 of 10: 100 × 1.2, not × 2"
    );
    // A burst pattern spread over short windows counts, under the lowest
    // limit of them: half of 10 periods throttled, 200 m at worst.
    let mut m = ThrottleMemory::default();
    for limit in [300, 200, 300, 300, 300] {
        m.update(MilliCpu(limit), 2, 1, 0.05, 0.2);
    }
    assert_eq!(m.need(MilliCpu(20)), MilliCpu(400));
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
        wait_ns: None,
    };
    let b = Counters {
        at_ns: 2 * SEC,
        usage_ns: 500_000_010,
        throttled_ns: 100,
        nr_periods: 15,
        nr_throttled: 6,
        psi_some_ns: Some(9),
        wait_ns: None,
    };
    let s = Sample::new(&a, &b).unwrap();
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
fn waiting_counts_as_demand_and_a_falling_wait_as_none() {
    let at = |t: u64, usage_ms: u64, wait_ms: Option<u64>| Counters {
        at_ns: t * SEC,
        usage_ns: usage_ms * 1_000_000,
        wait_ns: wait_ms.map(|w| w * 1_000_000),
        ..Counters::default()
    };
    // 400 m used, 600 m of thread-time waiting for a CPU: it wanted 1000 m.
    let s = Sample::new(&at(1, 0, Some(100)), &at(2, 400, Some(700))).unwrap();
    assert_eq!(s.wait_ns, Some(600_000_000));
    assert!((s.raw_demand_millicores() - 1000.0).abs() < 1e-9);
    assert!((s.wait_millicores() - 600.0).abs() < 1e-9);
    // Threads that exited took their wait with them: no wait, no error.
    let s = Sample::new(&at(1, 0, Some(700)), &at(2, 400, Some(100))).unwrap();
    assert_eq!(s.wait_ns, Some(0));
    assert!((s.raw_demand_millicores() - 400.0).abs() < 1e-9);
    // Not measured on one side: none.
    let s = Sample::new(&at(1, 0, None), &at(2, 400, Some(100))).unwrap();
    assert_eq!(s.wait_ns, None);
    let e = DemandEstimator::new().update(
        &Sample::new(&at(1, 0, Some(0)), &at(2, 400, Some(600))).unwrap(),
        &cfg(),
    );
    assert!(
        (e.wait - 600.0).abs() < 1e-9 && (e.raw - 1000.0).abs() < 1e-9,
        "{e:?}"
    );
    // The limit follows what the pod used and its limit held back: its wait
    // is the market's contention signal, not a reason to raise its own limit.
    assert!(
        (e.smoothed - 400.0).abs() < 1e-9 && (e.peak - 400.0).abs() < 1e-9,
        "{e:?}"
    );
    assert_eq!(e.need, MilliCpu(420));
    assert!((e.window_s - 1.0).abs() < 1e-12);
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
    assert!(
        DemandConfig {
            window_s: 0.0,
            ..cfg()
        }
        .validate()
        .is_err()
    );
    assert!(cfg().validate().is_ok());
}

/// A window of `secs` seconds at `demand` millicores, unthrottled.
fn window_of(secs: f64, demand: f64) -> Sample {
    let ns = (secs * 1e9) as u64;
    Sample {
        window_ns: ns,
        usage_ns: (demand / 1000.0 * ns as f64) as u64,
        throttled_ns: 0,
        nr_periods: 10,
        nr_throttled: 0,
        psi_some_ns: None,
        wait_ns: None,
    }
}

#[test]
fn a_short_first_window_does_not_set_the_estimate() {
    // A square wave of 500 m (1 s at 1000 m, 1 s idle), first seen through a
    // 0.2 s window of its busy half: the loop woke early on the first throttling.
    let mut e = DemandEstimator::new();
    let first = e.update(&window_of(0.2, 1000.0), &cfg());
    assert!((first.smoothed - 1000.0).abs() < 1.0, "{first:?}");
    // The rest of the first second: the estimate is the mean so far.
    let second = e.update(&window_of(0.8, 250.0), &cfg());
    assert!((second.smoothed - 400.0).abs() < 1.0, "{second:?}");
    // Then whole windows around 500 m: within 10 % after a few windows, where
    // starting from 1000 m and decreasing at α_down would still be at 600 m.
    let mut last = second;
    for i in 0..6 {
        last = e.update(
            &window_of(1.0, if i % 2 == 0 { 600.0 } else { 400.0 }),
            &cfg(),
        );
    }
    assert!((last.smoothed - 500.0).abs() <= 50.0, "{last:?}");
    assert_eq!(last.samples, 8);
}

#[test]
fn windows_are_weighted_by_length() {
    // Ten 0.1 s windows move the estimate as far as one 1 s window.
    let (mut sliced, mut whole) = (DemandEstimator::new(), DemandEstimator::new());
    sliced.update(&window_of(1.0, 200.0), &cfg());
    whole.update(&window_of(1.0, 200.0), &cfg());
    let mut s = None;
    for _ in 0..10 {
        s = Some(sliced.update(&window_of(0.1, 1000.0), &cfg()));
    }
    let w = whole.update(&window_of(1.0, 1000.0), &cfg());
    let s = s.map(|s| s.smoothed).unwrap_or_default();
    assert!(
        (s - w.smoothed).abs() < 1e-6,
        "sliced {s} vs whole {}",
        w.smoothed
    );
    assert!(
        (w.smoothed - 440.0).abs() < 1e-6,
        "α_up 0.3: {}",
        w.smoothed
    );
    // One short spike moves it a little, not by α_up.
    let mut e = DemandEstimator::new();
    e.update(&window_of(1.0, 200.0), &cfg());
    let spike = e.update(&window_of(0.2, 2000.0), &cfg());
    let expected = 200.0 + (1.0 - 0.7f64.powf(0.2)) * 1800.0;
    assert!((spike.smoothed - expected).abs() < 1e-6, "{spike:?}");
    assert!(spike.smoothed < 350.0, "{spike:?}");
    // With a 2 s tick, a 2 s window counts as one.
    let two = DemandConfig {
        window_s: 2.0,
        ..cfg()
    };
    let mut e = DemandEstimator::new();
    e.update(&window_of(2.0, 200.0), &two);
    let w = e.update(&window_of(2.0, 1000.0), &two);
    assert!((w.smoothed - 440.0).abs() < 1e-6, "{w:?}");
}

#[test]
fn pod_need_sums_containers() {
    assert_eq!(pod_need(&[MilliCpu(100), MilliCpu(250)]), MilliCpu(350));
    assert_eq!(pod_need(&[]), MilliCpu(0));
}

#[test]
fn the_peak_keeps_what_ran_not_a_throttled_windows_estimate() {
    // A 300 m load under a 200 m limit, read with 300 m of overestimate: the
    // estimate jumps (the raise comes at once); the peak keeps the 200 m that
    // ran, below the estimate.
    let mut est = DemandEstimator::new();
    let e = est.update(&window(300.0, 200.0, 300.0), &cfg());
    assert!((e.smoothed - 600.0).abs() < 1e-9, "{e:?}");
    assert!(e.peak < e.smoothed, "{e:?}");
    // Raised to 800 m: the load shows its 300 m. As the estimate comes down,
    // no headroom is left over from the throttled reading (floored at the
    // estimate, the peak stood 250 m above it after 30 s).
    for _ in 0..30 {
        let e = est.update(&window(300.0, 800.0, 0.0), &cfg());
        assert!(e.peak - e.smoothed < 10.0, "{e:?}");
    }
    // An unthrottled burst is remembered as seen, above the estimate.
    let e = est.update(&window(900.0, 1000.0, 0.0), &cfg());
    assert!((e.peak - 900.0).abs() < 1e-9, "{e:?}");
    assert!(e.need >= MilliCpu(900), "{e:?}");
}
