//! The simulated CFS: one bandwidth period on one node.
//!
//! Each pod wants `demand` millicores of CPU this period. A quota caps what it may
//! run (`min(demand, quota)`); when the capped demands of all pods exceed the node's
//! capacity, CPU is shared by weight like `cpu.weight` (water-filling: nobody gets
//! more than it can run). A pod whose demand is above its quota is throttled for
//! the rest of the period: the period counts as throttled and the held-back
//! runnable time `(demand − quota) × period` is added to its throttled time, the
//! way the kernel sums throttled time over a group's run queues.

use crate::market::water_fill;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PodLoad {
    pub demand_m: f64,
    /// `None`: no limit.
    pub quota_m: Option<f64>,
    pub weight: f64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PeriodOutcome {
    pub usage_m: f64,
    pub throttled: bool,
    /// Runnable CPU held back by the quota, in millicores over the period.
    pub held_back_m: f64,
    /// Whether a bandwidth period ran (quota set and the pod had work).
    pub active: bool,
}

/// Buffers [`period`] reuses between calls.
#[derive(Debug, Default)]
pub struct Scratch {
    capped: Vec<f64>,
    lower: Vec<f64>,
    weights: Vec<f64>,
}

/// Runs one period. `out` and `scratch` are reused to avoid allocation.
///
/// A pod counts as throttled only when it ran out of quota: its demand is above
/// the quota *and* it got the whole quota. A pod held below its quota by
/// contention for the node is not throttled (the kernel would not throttle it;
/// it waits on the run queue instead).
pub fn period(
    capacity_m: f64,
    pods: &[PodLoad],
    out: &mut Vec<PeriodOutcome>,
    scratch: &mut Scratch,
) {
    out.clear();
    let capped = &mut scratch.capped;
    capped.clear();
    capped.extend(
        pods.iter()
            .map(|p| p.quota_m.map_or(p.demand_m, |q| p.demand_m.min(q)).max(0.0)),
    );
    let total: f64 = capped.iter().sum();
    if total > capacity_m {
        scratch.lower.clear();
        scratch.lower.resize(pods.len(), 0.0);
        scratch.weights.clear();
        scratch
            .weights
            .extend(pods.iter().map(|p| p.weight.max(1e-9)));
        let level = water_fill(&scratch.lower, capped, &scratch.weights, capacity_m);
        for (c, &w) in capped.iter_mut().zip(&scratch.weights) {
            *c = (level * w).min(*c);
        }
    }
    for (p, &u) in pods.iter().zip(capped.iter()) {
        let throttled = p
            .quota_m
            .is_some_and(|q| p.demand_m > q + 1e-9 && u >= q - 1e-6);
        out.push(PeriodOutcome {
            usage_m: u,
            throttled,
            held_back_m: match p.quota_m {
                Some(q) if throttled => p.demand_m - q,
                _ => 0.0,
            },
            active: p.quota_m.is_some() && p.demand_m > 0.0,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_pod_quota_20_percent_demand_100() {
        let mut out = Vec::new();
        period(
            2000.0,
            &[PodLoad {
                demand_m: 1000.0,
                quota_m: Some(200.0),
                weight: 1.0,
            }],
            &mut out,
            &mut Scratch::default(),
        );
        assert_eq!(out[0].usage_m, 200.0);
        assert!(out[0].throttled && out[0].active);
        assert_eq!(out[0].held_back_m, 800.0);
    }

    #[test]
    fn no_limits_share_spare_cpu_by_weight() {
        let mut out = Vec::new();
        let pods = [
            PodLoad {
                demand_m: 2000.0,
                quota_m: None,
                weight: 1.0,
            },
            PodLoad {
                demand_m: 2000.0,
                quota_m: None,
                weight: 3.0,
            },
            PodLoad {
                demand_m: 100.0,
                quota_m: None,
                weight: 1.0,
            },
        ];
        period(2000.0, &pods, &mut out, &mut Scratch::default());
        // The small pod is served; the rest splits 1:3.
        assert!((out[2].usage_m - 100.0).abs() < 1e-6);
        assert!((out[0].usage_m - 475.0).abs() < 1e-6, "{out:?}");
        assert!((out[1].usage_m - 1425.0).abs() < 1e-6, "{out:?}");
        assert!(out.iter().all(|o| !o.throttled && !o.active));
    }

    #[test]
    fn quota_below_demand_throttles_even_on_an_idle_node() {
        let mut out = Vec::new();
        period(
            4000.0,
            &[PodLoad {
                demand_m: 500.0,
                quota_m: Some(500.0),
                weight: 1.0,
            }],
            &mut out,
            &mut Scratch::default(),
        );
        assert!(!out[0].throttled, "demand equal to quota is not throttled");
        period(
            4000.0,
            &[PodLoad {
                demand_m: 501.0,
                quota_m: Some(500.0),
                weight: 1.0,
            }],
            &mut out,
            &mut Scratch::default(),
        );
        assert!(out[0].throttled);
    }

    #[test]
    fn contention_below_quota_is_not_throttling() {
        // Two pods with 1500 m quotas want 2000 m each on a 2000 m node: each gets
        // 1000 m, below its quota, so the quota never runs out.
        let pod = PodLoad {
            demand_m: 2000.0,
            quota_m: Some(1500.0),
            weight: 1.0,
        };
        let mut out = Vec::new();
        period(2000.0, &[pod, pod], &mut out, &mut Scratch::default());
        for o in &out {
            assert!((o.usage_m - 1000.0).abs() < 1e-6, "{out:?}");
            assert!(!o.throttled && o.held_back_m == 0.0 && o.active, "{out:?}");
        }
        // With 600 m quotas the quota is the bound: throttled, the rest idles.
        let pod = PodLoad {
            quota_m: Some(600.0),
            ..pod
        };
        period(2000.0, &[pod, pod], &mut out, &mut Scratch::default());
        for o in &out {
            assert!(o.usage_m == 600.0 && o.throttled && o.held_back_m == 1400.0);
        }
    }
}
