//! `cargo bench -p mbcas-daemon --bench core`: the decision core's cost.
//!
//! * `market/clear/N`: one market clearing with N contended pods (goal: 10 000
//!   pods under 1 ms on one core);
//! * `tick/demand+policy/N`: one decision round's per-pod work — a demand update
//!   for each pod plus the policy over all of them.

use std::{hint::black_box, time::Duration};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use mbcas::{
    demand::{DemandConfig, DemandEstimator, Sample},
    market::{Bid, DEFAULT_OVERCOMMIT, MarketInput, clear},
    policy::{PodView, Policy, PolicyConfig},
    units::{MilliCpu, PodKey},
};

/// A deterministic pseudo-random market: demands and weights spread over a
/// range, total need about twice the capacity, some CPU idle to lend, and the
/// over-commit budget binding.
fn market(n: usize) -> MarketInput {
    let mut s: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let bids: Vec<Bid> = (0..n)
        .map(|i| {
            let req = 100 + next() % 900;
            let d = next() % 3000;
            Bid {
                key: PodKey::from(format!("pod-{i}")),
                weight: req as f64,
                floor: MilliCpu(req),
                cap: MilliCpu(8000),
                demand: MilliCpu(d),
                need: MilliCpu(d + d / 5),
                recent: None,
            }
        })
        .collect();
    let floors: u64 = bids.iter().map(|b| b.floor.0).sum();
    let needs: u64 = bids.iter().map(|b| b.need.0.max(b.floor.0)).sum();
    MarketInput {
        capacity: MilliCpu(floors + (needs - floors.min(needs)) / 2),
        total_weight: None,
        idle: MilliCpu(floors / 10),
        overcommit: DEFAULT_OVERCOMMIT,
        bids,
    }
}

fn bench_market(c: &mut Criterion) {
    let mut g = c.benchmark_group("market/clear");
    for n in [10, 110, 1_000, 10_000] {
        let input = market(n);
        g.bench_with_input(BenchmarkId::from_parameter(n), &input, |b, input| {
            b.iter(|| clear(black_box(input)))
        });
    }
    g.finish();
}

fn bench_tick(c: &mut Criterion) {
    let mut g = c.benchmark_group("tick/demand+policy");
    for n in [110, 1_000, 10_000] {
        let dcfg = DemandConfig::default();
        let mut estimators: Vec<DemandEstimator> = (0..n).map(|_| DemandEstimator::new()).collect();
        let mut policy = Policy::new(PolicyConfig::default());
        let sample = Sample {
            window_ns: 1_000_000_000,
            usage_ns: 400_000_000,
            throttled_ns: 50_000_000,
            nr_periods: 10,
            nr_throttled: 2,
            psi_some_ns: None,
            wait_ns: None,
        };
        let views: Vec<PodView> = (0..n)
            .map(|i| PodView {
                key: PodKey::from(format!("pod-{i}")),
                current: MilliCpu(500),
                original: MilliCpu(500),
                floor: MilliCpu(100),
                proposed: MilliCpu(520 + (i as u64 % 7) * 40),
                base: MilliCpu(520),
                need: MilliCpu(600),
                peak: MilliCpu(500),
                used: MilliCpu(480),
                throttled_ratio: 0.2,
                samples: 10,
                saturated: false,
                contended: false,
                exclusion: None,
            })
            .collect();
        let mut t = 0u64;
        g.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter(|| {
                for e in estimators.iter_mut() {
                    black_box(e.update(black_box(&sample), &dcfg));
                }
                t += 1;
                black_box(policy.decide(Duration::from_secs(t), MilliCpu(u64::MAX / 4), &views))
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench_market, bench_tick);
criterion_main!(benches);
