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

/// Runs one period. `out` is reused to avoid allocation.
pub fn period(capacity_m: f64, pods: &[PodLoad], out: &mut Vec<PeriodOutcome>) {
    out.clear();
    let mut capped = Vec::with_capacity(pods.len());
    for p in pods {
        let c = p.quota_m.map_or(p.demand_m, |q| p.demand_m.min(q));
        capped.push(c.max(0.0));
    }
    let total: f64 = capped.iter().sum();
    let usage: Vec<f64> = if total <= capacity_m {
        capped.clone()
    } else {
        let lower = vec![0.0; pods.len()];
        let weights: Vec<f64> = pods.iter().map(|p| p.weight.max(1e-9)).collect();
        let level = water_fill(&lower, &capped, &weights, capacity_m);
        capped
            .iter()
            .zip(&weights)
            .map(|(&c, &w)| (level * w).min(c))
            .collect()
    };
    for (p, &u) in pods.iter().zip(&usage) {
        let throttled = p.quota_m.is_some_and(|q| p.demand_m > q + 1e-9);
        out.push(PeriodOutcome {
            usage_m: u,
            throttled,
            held_back_m: if throttled {
                p.demand_m - p.quota_m.unwrap_or(p.demand_m)
            } else {
                0.0
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
        period(2000.0, &pods, &mut out);
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
        );
        assert!(out[0].throttled);
    }
}
