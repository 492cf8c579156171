//! Outcome tests: the claims of the README's "How MBCAS compares", checked on
//! every shipped scenario over several seeds. A claim that does not hold stays
//! here, `#[ignore]`d with its numbers, so the failure is documented and loud
//! (`cargo test -- --ignored` shows it).
// Test helpers: an unwrap that fails is the test failing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::HashMap,
    sync::{Mutex, OnceLock},
};

use mbcas::sim::{PolicyMetrics, run_policy, scenario::Scenario};

const SEEDS: [u64; 3] = [1, 2, 3];

const SCENARIOS: [&str; 16] = [
    "steady-mix",
    "step-up-down",
    "noisy-neighbour",
    "startup-storm",
    "diurnal",
    "overcommitted",
    "bursty-microservices",
    "latency-noisy-neighbour",
    "microbursts",
    "rare-burst",
    "in-phase-bursts",
    "runaway",
    "guaranteed-neighbours",
    "churn",
    "service-step",
    "service-crowded",
];

/// (scenario, policy, seed) → outcome.
type Runs = Mutex<HashMap<(String, String, u64), PolicyMetrics>>;

/// Runs are shared between the claims (the same scenario, policy and seed is
/// simulated once per test binary).
fn run(scenario: &str, policy: &str, seed: u64) -> PolicyMetrics {
    static CACHE: OnceLock<Runs> = OnceLock::new();
    let key = (scenario.to_owned(), policy.to_owned(), seed);
    let cache = CACHE.get_or_init(Default::default);
    if let Some(m) = cache.lock().ok().and_then(|c| c.get(&key).cloned()) {
        return m;
    }
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../scenarios")
        .join(format!("{scenario}.json"));
    let s = Scenario::from_file(&path).unwrap();
    let m = run_policy(&s, policy, seed).unwrap_or_else(|| panic!("{policy} unknown"));
    if let Ok(mut c) = cache.lock() {
        c.insert(key, m.clone());
    }
    m
}

/// Throttled p50 ≤ min(static, 0.05) and p99 ≤ static.
fn throttles_less_than_static(scenario: &str) {
    for seed in SEEDS {
        let (mb, st) = (run(scenario, "mbcas", seed), run(scenario, "static", seed));
        assert!(
            mb.throttled_ratio_p50 <= st.throttled_ratio_p50.min(0.05),
            "{scenario} seed {seed}: throttled p50 mbcas {:.3} vs static {:.3} (and 0.05)",
            mb.throttled_ratio_p50,
            st.throttled_ratio_p50
        );
        assert!(
            mb.throttled_ratio_p99 <= st.throttled_ratio_p99,
            "{scenario} seed {seed}: throttled p99 mbcas {:.3} vs static {:.3}",
            mb.throttled_ratio_p99,
            st.throttled_ratio_p99
        );
    }
}

/// Unmet demand ≤ 1.10 × no limits' + 0.5 % of all demand.
fn unmet_close_to_no_limits(scenario: &str) {
    for seed in SEEDS {
        let (mb, nl) = (
            run(scenario, "mbcas", seed),
            run(scenario, "nolimits", seed),
        );
        let bound = 1.10 * nl.unmet_core_seconds + 0.005 * mb.demand_core_seconds;
        assert!(
            mb.unmet_core_seconds <= bound,
            "{scenario} seed {seed}: unmet mbcas {:.1} core·s vs no limits {:.1} (bound {bound:.1}, demand {:.1})",
            mb.unmet_core_seconds,
            nl.unmet_core_seconds,
            mb.demand_core_seconds
        );
    }
}

/// `what` of MBCAS's run is at most 1 % of all demand, on every seed.
fn at_most_a_percent_of_demand(scenario: &str, what: &str, get: fn(&PolicyMetrics) -> f64) {
    for seed in SEEDS {
        let mb = run(scenario, "mbcas", seed);
        assert!(
            get(&mb) <= 0.01 * mb.demand_core_seconds,
            "{scenario} seed {seed}: {what} {:.1} core·s of {:.1} demand",
            get(&mb),
            mb.demand_core_seconds
        );
    }
}

/// Quotas hold back CPU while the node idles for at most 1 % of the demand.
fn little_throttling_while_idle(scenario: &str) {
    at_most_a_percent_of_demand(scenario, "idle while throttled", |m| {
        m.idle_while_throttled_core_seconds
    });
}

/// Pods get what they want of their no-limits share: shortfall ≤ 1 % of demand.
fn fair_share_met(scenario: &str) {
    at_most_a_percent_of_demand(scenario, "fair-share shortfall", |m| {
        m.fair_shortfall_core_seconds
    });
}

/// At most 40 resizes per pod-hour, fewer than Autothrottle, nobody starved.
fn stable_and_no_starvation(scenario: &str) {
    for seed in SEEDS {
        let (mb, at) = (
            run(scenario, "mbcas", seed),
            run(scenario, "autothrottle", seed),
        );
        assert!(
            mb.resizes_per_pod_hour <= 40.0,
            "{scenario} seed {seed}: {:.1} resizes/pod·h",
            mb.resizes_per_pod_hour
        );
        assert!(
            mb.resizes_per_pod_hour < at.resizes_per_pod_hour,
            "{scenario} seed {seed}: resizes/pod·h mbcas {:.1} vs autothrottle {:.1}",
            mb.resizes_per_pod_hour,
            at.resizes_per_pod_hour
        );
        assert_eq!(mb.starved_pods, 0, "{scenario} seed {seed}: {mb:?}");
    }
}

/// The request latency users feel: p99 under MBCAS ≤ static limits' and close
/// to no limits' (within 25 % or 5 ms).
fn latency_close_to_no_limits(scenario: &str) {
    for seed in SEEDS {
        let (mb, st, nl) = (
            run(scenario, "mbcas", seed),
            run(scenario, "static", seed),
            run(scenario, "nolimits", seed),
        );
        assert!(
            mb.requests > 1000,
            "{scenario}: premise, requests served: {mb:?}"
        );
        let close = (1.25 * nl.latency_p99_ms).max(nl.latency_p99_ms + 5.0);
        assert!(
            mb.latency_p99_ms <= st.latency_p99_ms && mb.latency_p99_ms <= close,
            "{scenario} seed {seed}: p99 latency mbcas {:.1} ms, static {:.1} ms, no limits {:.1} ms",
            mb.latency_p99_ms,
            st.latency_p99_ms,
            nl.latency_p99_ms
        );
    }
}

fn fair_under_contention(scenario: &str) {
    for seed in SEEDS {
        let mb = run(scenario, "mbcas", seed);
        assert!(
            mb.jain >= 0.95,
            "{scenario} seed {seed}: Jain {:.3}",
            mb.jain
        );
    }
}

macro_rules! per_scenario {
    ($claim:ident: $($(#[$attr:meta])* $name:ident = $file:literal),* $(,)?) => {
        mod $claim {
            $(
                #[test]
                $(#[$attr])*
                fn $name() {
                    super::$claim($file);
                }
            )*
        }
    };
}

macro_rules! every_scenario {
    ($($claim:ident),*) => {
        $(
            per_scenario!($claim:
                steady_mix = "steady-mix",
                step_up_down = "step-up-down",
                noisy_neighbour = "noisy-neighbour",
                startup_storm = "startup-storm",
                diurnal = "diurnal",
                overcommitted = "overcommitted",
                bursty_microservices = "bursty-microservices",
                latency_noisy_neighbour = "latency-noisy-neighbour",
                microbursts = "microbursts",
                rare_burst = "rare-burst",
                in_phase_bursts = "in-phase-bursts",
                runaway = "runaway",
                guaranteed_neighbours = "guaranteed-neighbours",
                churn = "churn",
                service_step = "service-step",
                service_crowded = "service-crowded",
            );
        )*
    };
}

every_scenario!(
    throttles_less_than_static,
    unmet_close_to_no_limits,
    little_throttling_while_idle,
    stable_and_no_starvation
);

per_scenario!(fair_share_met:
    steady_mix = "steady-mix",
    step_up_down = "step-up-down",
    noisy_neighbour = "noisy-neighbour",
    startup_storm = "startup-storm",
    diurnal = "diurnal",
    overcommitted = "overcommitted",
    bursty_microservices = "bursty-microservices",
    latency_noisy_neighbour = "latency-noisy-neighbour",
    #[ignore = "claim does not hold: seed 1 fair-share shortfall 117.6 core·s of 7449 demand (1.58 % > 1 %): the fan-out pods' first bursts are throttled while their limits climb from 300 m (≈ ×1.5 a round) to the 80 ms of CPU a 100 ms period of fan-out needs; see README, How MBCAS compares"]
    microbursts = "microbursts",
    rare_burst = "rare-burst",
    in_phase_bursts = "in-phase-bursts",
    runaway = "runaway",
    guaranteed_neighbours = "guaranteed-neighbours",
    churn = "churn",
    service_step = "service-step",
    service_crowded = "service-crowded",
);

per_scenario!(latency_close_to_no_limits:
    latency_noisy_neighbour = "latency-noisy-neighbour",
    microbursts = "microbursts",
);

per_scenario!(fair_under_contention:
    #[ignore = "claim does not hold: Jain 0.941 < 0.95 on seed 1 (static 0.941, no limits 1.000): the Jain index here averages the rare periods where pods contend; see README, How MBCAS compares"]
    noisy_neighbour = "noisy-neighbour",
    startup_storm = "startup-storm",
    overcommitted = "overcommitted",
);

#[test]
fn every_shipped_scenario_is_covered() {
    let mut shipped: Vec<String> =
        std::fs::read_dir(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios"))
            .unwrap()
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_suffix(".json"))
                    .map(str::to_owned)
            })
            .collect();
    shipped.sort();
    let mut ours: Vec<&str> = SCENARIOS.to_vec();
    ours.sort_unstable();
    assert_eq!(shipped, ours);
}

#[test]
fn no_starvation_in_the_startup_storm_where_burst_oscillates() {
    let burst = run("startup-storm", "burst", 1);
    assert!(
        burst.oscillations > 0,
        "premise: burst oscillates in the storm ({burst:?})"
    );
    let mb = run("startup-storm", "mbcas", 1);
    assert_eq!(mb.starved_pods, 0, "{mb:?}");
    assert!(
        mb.oscillations < burst.oscillations,
        "mbcas {mb:?} vs burst {burst:?}"
    );
}

/// The project plan's claim: after a step up of a service's load, MBCAS gives
/// the service the capacity it needs (its replicas' limits add up to the load)
/// at least 10× sooner than the HPA does (new replicas: the next 15 s sync,
/// then their start-up). Every step is met by both; MBCAS's slowest step
/// against the HPA's median.
fn reacts_ten_times_faster_than_hpa(scenario: &str) {
    for seed in SEEDS {
        let (mb, hpa) = (run(scenario, "mbcas", seed), run(scenario, "hpa", seed));
        assert!(
            mb.reaction_steps > 0 && mb.reaction_censored == 0 && hpa.reaction_censored == 0,
            "seed {seed}: {mb:?} {hpa:?}"
        );
        assert!(
            mb.reaction_p99_s * 10.0 <= hpa.reaction_p50_s,
            "seed {seed}: MBCAS p99 {:.1} s, HPA p50 {:.1} s",
            mb.reaction_p99_s,
            hpa.reaction_p50_s
        );
    }
}

per_scenario!(reacts_ten_times_faster_than_hpa:
    service_step = "service-step",
    service_crowded = "service-crowded",
);
