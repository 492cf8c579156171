//! Simulator scenario files: refused with a message, or valid and simulable
//! for a short while without a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mbcas::sim::scenario::Scenario;

fuzz_target!(|text: &str| {
    let Ok(mut s) = Scenario::parse(text, "fuzz") else {
        return;
    };
    // Keep a run short: past the first HPA sync (15 s) on a few nodes.
    s.duration_s = s.duration_s.min(20.0);
    let pods: u64 = s
        .nodes
        .iter()
        .map(|n| {
            u64::from(n.count)
                * (n.pods.iter().map(|p| u64::from(p.count)).sum::<u64>()
                    + n.services.iter().map(|v| u64::from(v.replicas.max)).sum::<u64>())
        })
        .sum();
    if pods > 64 {
        return;
    }
    // One thread: a panic then happens on the fuzzer's thread, which writes the input out.
    let opts = mbcas::sim::RunOptions {
        threads: 1,
        ..Default::default()
    };
    // MBCAS's limits and the HPA's replicas at once.
    let _ = mbcas::sim::run_policy_with(&s, "mbcas+hpa", 1, opts);
});
