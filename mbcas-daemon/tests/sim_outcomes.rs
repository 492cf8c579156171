//! Outcome tests: the claims of the README's "How MBCAS compares", checked on
//! the shipped scenarios with seed 1. A claim that does not hold stays here,
//! `#[ignore]`d with its numbers, so the failure is documented and loud
//! (`cargo test -- --ignored` shows it).

use mbcas::sim::{PolicyMetrics, run_policy, scenario::Scenario};

const SEED: u64 = 1;

fn run(scenario: &str, policy: &str) -> PolicyMetrics {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../scenarios")
        .join(format!("{scenario}.json"));
    let s = Scenario::from_file(&path).unwrap_or_else(|e| panic!("{e}"));
    run_policy(&s, policy, SEED).unwrap_or_else(|| panic!("{policy} unknown"))
}

fn throttles_less_than_static(scenario: &str) {
    let (mb, st) = (run(scenario, "mbcas"), run(scenario, "static"));
    assert!(
        mb.throttled_ratio_p50 < st.throttled_ratio_p50
            || (st.throttled_ratio_p50 == 0.0 && mb.throttled_ratio_p50 == 0.0),
        "{scenario}: throttled p50 mbcas {:.3} vs static {:.3}",
        mb.throttled_ratio_p50,
        st.throttled_ratio_p50
    );
    assert!(
        mb.throttled_ratio_p99 <= st.throttled_ratio_p99,
        "{scenario}: throttled p99 mbcas {:.3} vs static {:.3}",
        mb.throttled_ratio_p99,
        st.throttled_ratio_p99
    );
}

fn fair_under_contention(scenario: &str) {
    let mb = run(scenario, "mbcas");
    assert!(mb.jain >= 0.95, "{scenario}: Jain {:.3}", mb.jain);
}

fn fewer_resizes_than_autothrottle(scenario: &str) {
    let (mb, at) = (run(scenario, "mbcas"), run(scenario, "autothrottle"));
    assert!(
        mb.resizes_per_pod_hour < at.resizes_per_pod_hour,
        "{scenario}: resizes/pod·h mbcas {:.1} vs autothrottle {:.1}",
        mb.resizes_per_pod_hour,
        at.resizes_per_pod_hour
    );
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

per_scenario!(throttles_less_than_static:
    #[ignore = "claim does not hold: throttled p50 mbcas 0.735 vs static 0.205 (the 10 % reserve leaves 400 m idle while demand is 95 % of the node); see README, How MBCAS compares"]
    steady_mix = "steady-mix",
    #[ignore = "claim does not hold: throttled p50 mbcas 0.488 vs static 0.000 (demand is 90 % of the node, then 135 % from 120 s to 300 s: with the 10 % reserve every mbcas pod is held at its quota, static pods mostly wait on the run queue instead); see README, How MBCAS compares"]
    step_up_down = "step-up-down",
    noisy_neighbour = "noisy-neighbour",
    startup_storm = "startup-storm",
    diurnal = "diurnal",
    #[ignore = "claim does not hold: throttled p50 mbcas 0.988 vs static 0.000 (static limits sum to 150 % of the node: contention, not quota, holds pods back; unmet demand mbcas 12462 vs static 11513 core·s, the difference being the 10 % reserve); see README, How MBCAS compares"]
    overcommitted = "overcommitted",
    #[ignore = "claim does not hold: throttled p50 mbcas 0.285 = static 0.285; see README, How MBCAS compares"]
    bursty_microservices = "bursty-microservices",
);

per_scenario!(fair_under_contention:
    #[ignore = "claim does not hold: Jain 0.949 < 0.95 (static 0.941); see README, How MBCAS compares"]
    noisy_neighbour = "noisy-neighbour",
    startup_storm = "startup-storm",
    overcommitted = "overcommitted",
);

per_scenario!(fewer_resizes_than_autothrottle:
    steady_mix = "steady-mix",
    step_up_down = "step-up-down",
    noisy_neighbour = "noisy-neighbour",
    startup_storm = "startup-storm",
    diurnal = "diurnal",
    overcommitted = "overcommitted",
    bursty_microservices = "bursty-microservices",
);

#[test]
fn no_starvation_in_the_startup_storm_where_burst_oscillates() {
    let burst = run("startup-storm", "burst");
    assert!(
        burst.oscillations > 0,
        "premise: burst oscillates in the storm ({burst:?})"
    );
    let mb = run("startup-storm", "mbcas");
    assert_eq!(mb.starved_pods, 0, "{mb:?}");
    assert!(
        mb.oscillations < burst.oscillations,
        "mbcas {mb:?} vs burst {burst:?}"
    );
}
