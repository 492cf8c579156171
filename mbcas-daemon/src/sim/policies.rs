//! The policies the simulator compares. Each sees what a real controller would
//! see (per-pod counters and its window's usage and throttling) and returns the
//! limits it wants; the simulator applies them after the actuation delay.
//!
//! * `mbcas`: this project's [`Engine`] (demand model, market, stability policy)
//!   as the daemon runs it: the node's whole capacity (the reserve is soft, held
//!   back only from what is lent, as the daemon does), floors max(request, 100 m),
//!   weights = requests, the demand model's window = the scenario's decision
//!   interval.
//! * `static`: limits never change.
//! * `nolimits`: pods run without limits (requests only); CPU is shared by weight.
//! * `burst` (Koordinator-style CFS quota burst, 1 s loop): a throttled pod's
//!   quota grows ×1.2 up to 300 % of its limit while node usage is under the
//!   share-pool threshold (50 %); above the 90 % cooling band, and for pods no
//!   longer throttled, quotas shrink ×0.8 back towards the limit.
//! * `vpa` (VPA-style recommender): a CPU usage histogram with exponentially
//!   decaying sample weights (half-life 24 h), target = P90 × 1.15, recomputed every
//!   minute; the updater resizes in place when the target differs by > 10 %.
//! * `autothrottle` (per-pod controller, 100 ms samples, 1 s decisions): raise the
//!   limit ×1.25 when more than 10 % of the second's periods were throttled, lower
//!   it ×0.9 when none were, roll a decrease back when the next second throttles;
//!   no node arbitration.

use std::time::Duration;

use crate::{
    demand::Counters,
    engine::{ConsumerInput, Engine, EngineConfig, NodeInput},
    policy::Exclusion,
    units::{MilliCpu, PodKey},
};

/// What a policy sees of one pod at a decision.
#[derive(Clone, Debug)]
pub struct PodObs {
    pub key: PodKey,
    pub request_m: u64,
    /// The limit the pod started with (`None`: none).
    pub original_m: Option<u64>,
    /// The limit in effect now.
    pub limit_m: Option<u64>,
    pub weight: f64,
    pub counters: Counters,
    /// Mean usage over the last decision window, millicores.
    pub usage_m: f64,
    /// Share of the window's periods that were throttled.
    pub throttled_ratio: f64,
    /// A pod MBCAS does not manage (Guaranteed, kube-system, opted out): the
    /// simulator never changes its limit, whatever a policy asks.
    pub excluded: bool,
}

#[derive(Clone, Copy, Debug)]
pub struct NodeObs {
    pub capacity_m: u64,
    /// Σ usage over the last window, millicores.
    pub usage_m: f64,
}

pub trait SimPolicy {
    fn name(&self) -> &'static str;
    /// Whether pods start without limits.
    fn unlimited(&self) -> bool {
        false
    }
    /// New limits wanted (same order as `pods`; `None` = no change).
    fn decide(&mut self, now_s: f64, node: &NodeObs, pods: &[PodObs]) -> Vec<Option<u64>>;
}

pub const ALL: [&str; 6] = [
    "mbcas",
    "static",
    "nolimits",
    "burst",
    "vpa",
    "autothrottle",
];

/// What a policy may know of the scenario before it starts.
#[derive(Clone, Copy, Debug)]
pub struct Context {
    pub decision_interval_s: f64,
    /// The node's reserve, a fraction of its capacity.
    pub reserve: f64,
}

/// A fresh policy instance for one node.
pub fn by_name(name: &str, ctx: &Context) -> Option<Box<dyn SimPolicy>> {
    Some(match name {
        "mbcas" => {
            let mut cfg = EngineConfig::default();
            cfg.demand.window_s = ctx.decision_interval_s;
            cfg.reserve = ctx.reserve;
            Box::new(Mbcas {
                engine: Engine::new(cfg),
                inputs: Vec::new(),
            })
        }
        "static" => Box::new(Static),
        "nolimits" => Box::new(NoLimits),
        "burst" => Box::new(Burst),
        "vpa" => Box::new(Vpa::default()),
        "autothrottle" => Box::new(Autothrottle::default()),
        _ => return None,
    })
}

pub struct Mbcas {
    engine: Engine,
    /// The engine's inputs, kept between rounds (a node's pods do not change in
    /// the simulator) so that keys are not cloned every round.
    inputs: Vec<ConsumerInput>,
}

impl SimPolicy for Mbcas {
    fn name(&self) -> &'static str {
        "mbcas"
    }

    fn decide(&mut self, now_s: f64, node: &NodeObs, pods: &[PodObs]) -> Vec<Option<u64>> {
        // As the daemon does: unmanaged pods' limits (their requests when they
        // have none) are not the market's to hand out.
        let unmanaged: u64 = pods
            .iter()
            .filter(|p| p.excluded)
            .map(|p| p.limit_m.unwrap_or(p.request_m))
            .sum();
        let capacity = MilliCpu(node.capacity_m.saturating_sub(unmanaged));
        let fresh = self.inputs.len() != pods.len()
            || self.inputs.iter().zip(pods).any(|(i, p)| i.key != p.key);
        if fresh {
            self.inputs = pods
                .iter()
                .map(|p| ConsumerInput {
                    key: p.key.clone(),
                    counters: p.counters,
                    current: MilliCpu::ZERO,
                    original: MilliCpu(p.original_m.unwrap_or(node.capacity_m)),
                    weight: p.weight,
                    floor: MilliCpu(p.request_m.max(100)),
                    cap: MilliCpu::ZERO,
                    exclusion: p.excluded.then_some(Exclusion::Guaranteed),
                    // The simulator enforces a limit the moment it is set.
                    window_limit: None,
                })
                .collect();
        }
        for (i, p) in self.inputs.iter_mut().zip(pods) {
            i.counters = p.counters;
            i.current = MilliCpu(p.limit_m.unwrap_or(node.capacity_m));
            i.cap = capacity.max(MilliCpu(p.request_m.max(100)));
        }
        match self.engine.step(
            Duration::from_secs_f64(now_s),
            &NodeInput::new(capacity),
            &self.inputs,
        ) {
            Ok(o) => o
                .rows
                .iter()
                .map(|r| r.changed().then_some(r.to.0))
                .collect(),
            Err(_) => vec![None; pods.len()],
        }
    }
}

pub struct Static;

impl SimPolicy for Static {
    fn name(&self) -> &'static str {
        "static"
    }

    fn decide(&mut self, _: f64, _: &NodeObs, pods: &[PodObs]) -> Vec<Option<u64>> {
        vec![None; pods.len()]
    }
}

pub struct NoLimits;

impl SimPolicy for NoLimits {
    fn name(&self) -> &'static str {
        "nolimits"
    }

    fn unlimited(&self) -> bool {
        true
    }

    fn decide(&mut self, _: f64, _: &NodeObs, pods: &[PodObs]) -> Vec<Option<u64>> {
        vec![None; pods.len()]
    }
}

pub struct Burst;

impl SimPolicy for Burst {
    fn name(&self) -> &'static str {
        "burst"
    }

    fn decide(&mut self, _: f64, node: &NodeObs, pods: &[PodObs]) -> Vec<Option<u64>> {
        let util = node.usage_m / node.capacity_m.max(1) as f64;
        pods.iter()
            .map(|p| {
                let (Some(base), Some(cur)) = (p.original_m, p.limit_m) else {
                    return None;
                };
                let ceiling = base * 3;
                let next = if util > 0.9 || p.throttled_ratio == 0.0 {
                    ((cur as f64 * 0.8) as u64).max(base)
                } else if util < 0.5 {
                    ((cur as f64 * 1.2) as u64).min(ceiling)
                } else {
                    cur
                };
                (next != cur).then_some(next)
            })
            .collect()
    }
}

/// Exponentially decaying histogram of usage (10 m buckets).
#[derive(Default)]
pub struct Vpa {
    hist: Vec<Vec<f64>>,
    last_recommend: Option<f64>,
}

const VPA_HALF_LIFE_S: f64 = 24.0 * 3600.0;
const VPA_BUCKET_M: f64 = 10.0;

impl SimPolicy for Vpa {
    fn name(&self) -> &'static str {
        "vpa"
    }

    fn decide(&mut self, now_s: f64, _: &NodeObs, pods: &[PodObs]) -> Vec<Option<u64>> {
        if self.hist.len() != pods.len() {
            self.hist = vec![Vec::new(); pods.len()];
        }
        // Sample weights grow with time instead of old ones decaying (equivalent, no rescaling).
        let w = (now_s / VPA_HALF_LIFE_S).exp2();
        for (h, p) in self.hist.iter_mut().zip(pods) {
            let b = (p.usage_m / VPA_BUCKET_M) as usize;
            if h.len() <= b {
                h.resize(b + 1, 0.0);
            }
            h[b] += w;
        }
        if self.last_recommend.is_some_and(|t| now_s - t < 60.0) {
            return vec![None; pods.len()];
        }
        self.last_recommend = Some(now_s);
        self.hist
            .iter()
            .zip(pods)
            .map(|(h, p)| {
                let cur = p.limit_m?;
                let total: f64 = h.iter().sum();
                let mut acc = 0.0;
                let mut p90 = 0.0;
                for (i, v) in h.iter().enumerate() {
                    acc += v;
                    if acc >= 0.9 * total {
                        p90 = (i as f64 + 1.0) * VPA_BUCKET_M;
                        break;
                    }
                }
                let target = ((p90 * 1.15) as u64).max(p.request_m).max(10);
                ((target as f64 - cur as f64).abs() > 0.1 * cur as f64).then_some(target)
            })
            .collect()
    }
}

#[derive(Default)]
pub struct Autothrottle {
    /// Per pod: the limit before the last decrease, and when it happened.
    last_decrease: Vec<Option<(u64, f64)>>,
}

impl SimPolicy for Autothrottle {
    fn name(&self) -> &'static str {
        "autothrottle"
    }

    fn decide(&mut self, now_s: f64, _: &NodeObs, pods: &[PodObs]) -> Vec<Option<u64>> {
        if self.last_decrease.len() != pods.len() {
            self.last_decrease = vec![None; pods.len()];
        }
        pods.iter()
            .enumerate()
            .map(|(i, p)| {
                let cur = p.limit_m?;
                let floor = p.request_m.max(10);
                let rollback = self.last_decrease[i].take();
                if p.throttled_ratio > 0.1 {
                    if let Some((prev, at)) = rollback
                        && now_s - at <= 2.0
                    {
                        return Some(prev);
                    }
                    return Some(((cur as f64 * 1.25) as u64).max(cur + 10));
                }
                if p.throttled_ratio == 0.0 {
                    let next = ((cur as f64 * 0.9) as u64).max(floor);
                    if next < cur {
                        self.last_decrease[i] = Some((cur, now_s));
                        return Some(next);
                    }
                }
                None
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(limit: u64, throttled: f64, usage: f64) -> PodObs {
        PodObs {
            key: "p".into(),
            request_m: 100,
            original_m: Some(500),
            limit_m: Some(limit),
            weight: 100.0,
            counters: Counters::default(),
            usage_m: usage,
            throttled_ratio: throttled,
            excluded: false,
        }
    }

    fn node(usage: f64) -> NodeObs {
        NodeObs {
            capacity_m: 4000,
            usage_m: usage,
        }
    }

    #[test]
    fn burst_steps() {
        let mut b = Burst;
        assert_eq!(
            b.decide(0.0, &node(1000.0), &[obs(500, 0.5, 500.0)]),
            vec![Some(600)]
        );
        assert_eq!(
            b.decide(0.0, &node(1000.0), &[obs(1450, 0.5, 500.0)]),
            vec![Some(1500)],
            "300 % ceiling"
        );
        assert_eq!(
            b.decide(0.0, &node(2400.0), &[obs(600, 0.5, 500.0)]),
            vec![None],
            "between threshold and cooling band"
        );
        assert_eq!(
            b.decide(0.0, &node(3800.0), &[obs(1000, 0.5, 500.0)]),
            vec![Some(800)],
            "cooling band"
        );
        assert_eq!(
            b.decide(0.0, &node(1000.0), &[obs(550, 0.0, 500.0)]),
            vec![Some(500)],
            "back to the limit"
        );
    }

    #[test]
    fn autothrottle_steps_and_rolls_back() {
        let mut a = Autothrottle::default();
        assert_eq!(
            a.decide(0.0, &node(0.0), &[obs(1000, 0.0, 100.0)]),
            vec![Some(900)]
        );
        // Throttled right after the decrease: roll back.
        assert_eq!(
            a.decide(1.0, &node(0.0), &[obs(900, 0.5, 900.0)]),
            vec![Some(1000)]
        );
        // Throttled with no recent decrease: ×1.25.
        assert_eq!(
            a.decide(2.0, &node(0.0), &[obs(1000, 0.5, 1000.0)]),
            vec![Some(1250)]
        );
        // Some throttling, under 10 %: hold.
        assert_eq!(
            a.decide(3.0, &node(0.0), &[obs(1250, 0.05, 1000.0)]),
            vec![None]
        );
    }

    #[test]
    fn vpa_targets_p90_plus_15_percent_every_minute() {
        let mut v = Vpa::default();
        let mut last = vec![None];
        for t in 0..61 {
            let usage = if t % 20 == 0 { 1000.0 } else { 400.0 };
            last = v.decide(f64::from(t), &node(0.0), &[obs(500, 0.0, usage)]);
            if t == 0 {
                // One sample (1000 m): P90 is the top of its bucket, 1010 m × 1.15.
                assert_eq!(last, vec![Some(1161)]);
            } else if t < 60 {
                assert_eq!(last, vec![None], "recommends once a minute");
            }
        }
        // 57 samples at 400 m, 4 at 1000 m: P90 = 410 m, target 471 m: within 10 % of 500 m.
        assert_eq!(last, vec![None]);
        let mut v2 = Vpa::default();
        for t in 0..60 {
            let _ = v2.decide(
                f64::from(t),
                &node(0.0),
                &[obs(300, 0.0, if t % 20 == 0 { 1000.0 } else { 400.0 })],
            );
        }
        assert_eq!(
            v2.decide(60.0, &node(0.0), &[obs(300, 0.0, 400.0)]),
            vec![Some(471)]
        );
    }
}
