//! Simulator scenario files: refused with a message, or valid and simulable
//! for a short while without a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mbcas::sim::scenario::Scenario;

fuzz_target!(|text: &str| {
    let Ok(mut s) = Scenario::parse(text, "fuzz") else {
        return;
    };
    // Keep a run short: a few simulated seconds on a few nodes.
    s.duration_s = s.duration_s.min(5.0);
    let pods: u64 = s
        .nodes
        .iter()
        .map(|n| u64::from(n.count) * n.pods.iter().map(|p| u64::from(p.count)).sum::<u64>())
        .sum();
    if pods > 64 {
        return;
    }
    // One thread: a panic then happens on the fuzzer's thread, which writes the input out.
    let opts = mbcas::sim::RunOptions {
        threads: 1,
        ..Default::default()
    };
    let _ = mbcas::sim::run_policy_with(&s, "mbcas", 1, opts);
});
