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
//! * `hpa` (the Horizontal Pod Autoscaler with the upstream defaults, on the
//!   scenario's services; limits static): see [`Hpa`].
//! * `mbcas+hpa`: both at once, as users would run them — MBCAS resizes every
//!   pod in place, the HPA scales the services' replicas.

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

/// What a horizontal policy sees of one service at an HPA sync.
#[derive(Clone, Debug, PartialEq)]
pub struct ServiceObs {
    /// Replicas wanted now (the Deployment's `spec.replicas`).
    pub replicas: u32,
    pub min: u32,
    pub max: u32,
    /// Target CPU utilization, percent of the request.
    pub target_pct: f64,
    pub request_m: u64,
    /// Each existing replica's mean usage since the last sync, millicores
    /// (`None`: not ready, or no sample yet — pending or starting).
    pub pods: Vec<Option<f64>>,
}

pub trait SimPolicy {
    fn name(&self) -> &'static str;
    /// Whether pods start without limits.
    fn unlimited(&self) -> bool {
        false
    }
    /// New limits wanted (same order as `pods`; `None` = no change).
    fn decide(&mut self, now_s: f64, node: &NodeObs, pods: &[PodObs]) -> Vec<Option<u64>>;
    /// Replicas wanted per service at an HPA sync (`None` = no change).
    fn scale(&mut self, _now_s: f64, services: &[ServiceObs]) -> Vec<Option<u32>> {
        vec![None; services.len()]
    }
}

/// The vertical policies (`cargo xtask compare` runs these).
pub const ALL: [&str; 6] = [
    "mbcas",
    "static",
    "nolimits",
    "burst",
    "vpa",
    "autothrottle",
];

/// The policies that scale services' replicas.
pub const HORIZONTAL: [&str; 2] = ["hpa", "mbcas+hpa"];

/// Every policy the simulator knows.
pub const EVERY: [&str; 8] = [
    "mbcas",
    "static",
    "nolimits",
    "burst",
    "vpa",
    "autothrottle",
    "hpa",
    "mbcas+hpa",
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
        "mbcas" => Box::new(mbcas(ctx)),
        "static" => Box::new(Static),
        "nolimits" => Box::new(NoLimits),
        "burst" => Box::new(Burst),
        "vpa" => Box::new(Vpa::default()),
        "autothrottle" => Box::new(Autothrottle::default()),
        "hpa" => Box::new(Hpa::default()),
        "mbcas+hpa" => Box::new(MbcasHpa {
            mbcas: mbcas(ctx),
            hpa: Hpa::default(),
        }),
        _ => return None,
    })
}

fn mbcas(ctx: &Context) -> Mbcas {
    let mut cfg = EngineConfig::default();
    cfg.demand.window_s = ctx.decision_interval_s;
    cfg.reserve = ctx.reserve;
    Mbcas {
        engine: Engine::new(cfg),
        inputs: Vec::new(),
    }
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
                    demoted: false,
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

/// The Horizontal Pod Autoscaler's CPU-utilization algorithm with the
/// upstream defaults (`kube-controller-manager` flags and `behavior`):
///
/// * every sync (15 s) utilization = Σ usage / Σ requests of the ready pods
///   with a sample; ratio = utilization / target; within the 10 % tolerance
///   nothing changes; otherwise desired = ⌈ratio × pods with samples⌉. On a
///   scale-up, pods not ready yet count as using nothing (and if that brings the
///   ratio back inside the tolerance or across 1, nothing changes); on a
///   scale-down they are left out;
/// * stabilization: scale-up window 0 s, scale-down window 300 s (the highest
///   recommendation of the last 5 minutes wins);
/// * rate: up by max(100 %, 4 pods) per 15 s, down by up to 100 % per 15 s,
///   both relative to the replicas at the start of the 15 s period;
/// * bounded by the service's `min` and `max`.
///
/// What it sees is the freshest a metrics pipeline could give: each pod's
/// mean usage since the last sync (metrics-server's 15 s resolution adds up to
/// another 15 s of age in a real cluster, not modelled — in the HPA's favour).
#[derive(Default)]
pub struct Hpa {
    /// Per service: past recommendations (time, replicas) and scale events
    /// (time, replicas before, replicas after).
    recs: Vec<Vec<(f64, u32)>>,
    events: Vec<Vec<(f64, u32, u32)>>,
}

pub const HPA_TOLERANCE: f64 = 0.1;
pub const HPA_DOWN_WINDOW_S: f64 = 300.0;
pub const HPA_RATE_PERIOD_S: f64 = 15.0;

impl Hpa {
    /// The replica count the metrics ask for, before stabilization and rate
    /// limits (`current` when they ask for no change).
    pub fn desired(svc: &ServiceObs) -> u32 {
        let current = svc.replicas;
        let samples: Vec<f64> = svc.pods.iter().flatten().copied().collect();
        if samples.is_empty() || svc.request_m == 0 {
            return current;
        }
        let request = svc.request_m as f64;
        let n = samples.len() as f64;
        let used: f64 = samples.iter().sum();
        let ratio = used / (n * request) * 100.0 / svc.target_pct;
        let unready = (svc.pods.len() - samples.len()) as f64;
        if ratio > 1.0 && unready > 0.0 {
            let all = n + unready;
            let new = used / (all * request) * 100.0 / svc.target_pct;
            let replicas = (new * all).ceil() as u32;
            if (1.0 - new).abs() <= HPA_TOLERANCE || new < 1.0 || replicas < current {
                return current;
            }
            return replicas;
        }
        if (1.0 - ratio).abs() <= HPA_TOLERANCE {
            return current;
        }
        (ratio * n).ceil() as u32
    }
}

impl SimPolicy for Hpa {
    fn name(&self) -> &'static str {
        "hpa"
    }

    fn decide(&mut self, _: f64, _: &NodeObs, pods: &[PodObs]) -> Vec<Option<u64>> {
        vec![None; pods.len()]
    }

    fn scale(&mut self, now_s: f64, services: &[ServiceObs]) -> Vec<Option<u32>> {
        if self.recs.len() != services.len() {
            self.recs = vec![Vec::new(); services.len()];
            self.events = vec![Vec::new(); services.len()];
        }
        services
            .iter()
            .enumerate()
            .map(|(i, svc)| {
                let current = svc.replicas;
                let desired = Self::desired(svc);
                // Stabilization: up over 0 s (this recommendation only), down
                // over the last 300 s (the highest).
                let recs = &mut self.recs[i];
                recs.retain(|&(t, _)| now_s - t < HPA_DOWN_WINDOW_S);
                let down = recs.iter().map(|r| r.1).fold(desired, u32::max);
                recs.push((now_s, desired));
                let stable = current.max(desired).min(down);
                // Rate limits relative to the start of the 15 s period.
                let events = &mut self.events[i];
                events.retain(|&(t, ..)| now_s - t < HPA_RATE_PERIOD_S);
                let added: i64 = events
                    .iter()
                    .map(|&(_, a, b)| i64::from(b) - i64::from(a))
                    .sum();
                let start = u32::try_from((i64::from(current) - added).max(0)).unwrap_or(0);
                let next = if stable > current {
                    let limit = (start * 2).max(start + 4);
                    stable.min(limit)
                } else {
                    // Down by up to 100 % of the period's start: no limit.
                    stable
                };
                let next = next.clamp(svc.min, svc.max);
                if next == current {
                    return None;
                }
                events.push((now_s, current, next));
                Some(next)
            })
            .collect()
    }
}

/// MBCAS and the HPA together (see the module documentation).
pub struct MbcasHpa {
    mbcas: Mbcas,
    hpa: Hpa,
}

impl SimPolicy for MbcasHpa {
    fn name(&self) -> &'static str {
        "mbcas+hpa"
    }

    fn decide(&mut self, now_s: f64, node: &NodeObs, pods: &[PodObs]) -> Vec<Option<u64>> {
        self.mbcas.decide(now_s, node, pods)
    }

    fn scale(&mut self, now_s: f64, services: &[ServiceObs]) -> Vec<Option<u32>> {
        self.hpa.scale(now_s, services)
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

    /// A service of `n` ready replicas at `usage` each, requests 500 m, target 70 %.
    fn svc(replicas: u32, ready: &[f64], unready: usize) -> ServiceObs {
        let mut pods: Vec<Option<f64>> = ready.iter().map(|&u| Some(u)).collect();
        pods.extend(std::iter::repeat_n(None, unready));
        ServiceObs {
            replicas,
            min: 1,
            max: 100,
            target_pct: 70.0,
            request_m: 500,
            pods,
        }
    }

    #[test]
    fn hpa_formula_tolerance_and_unready_pods() {
        // At target (350 m of 500 m = 70 %): no change; within 10 %: no change.
        assert_eq!(Hpa::desired(&svc(2, &[350.0, 350.0], 0)), 2);
        assert_eq!(Hpa::desired(&svc(2, &[380.0, 380.0], 0)), 2);
        // 2× the target: ⌈2 × 2⌉ = 4.
        assert_eq!(Hpa::desired(&svc(2, &[700.0, 700.0], 0)), 4);
        // 1.5 × target on 3 pods: ⌈4.5⌉ = 5.
        assert_eq!(Hpa::desired(&svc(3, &[525.0; 3], 0)), 5);
        // Scale-up with 2 pods still starting: they count as 0 %:
        // 1400 / (4 × 500) / 0.7 = 1.0 → inside the tolerance, no change.
        assert_eq!(Hpa::desired(&svc(4, &[700.0, 700.0], 2)), 4);
        // … and 1000 m each: 2000 / 2000 / 0.7 = 1.43 → ⌈5.7⌉ = 6.
        assert_eq!(Hpa::desired(&svc(4, &[1000.0, 1000.0], 2)), 6);
        // Scale-down leaves unready pods out: 100 m on 2 of 4 → ⌈0.571⌉ = 1.
        assert_eq!(Hpa::desired(&svc(4, &[100.0, 100.0], 2)), 1);
        // No samples at all: no change.
        assert_eq!(Hpa::desired(&svc(3, &[], 3)), 3);
    }

    /// Drives an HPA every 15 s over a scripted trace: `load(t)` is the
    /// service's whole usage, shared by its replicas, all ready at once.
    fn drive(load: impl Fn(f64) -> f64, until: f64, start: u32) -> Vec<(f64, u32)> {
        let mut h = Hpa::default();
        let mut replicas = start;
        let mut log = Vec::new();
        let mut t = 15.0;
        while t <= until {
            let each = load(t) / f64::from(replicas);
            let obs = svc(replicas, &vec![each; replicas as usize], 0);
            if let Some(n) = h.scale(t, &[obs])[0] {
                replicas = n;
                log.push((t, n));
            }
            t += 15.0;
        }
        log
    }

    #[test]
    fn hpa_scales_up_at_the_next_sync_doubling_per_period() {
        // 4 replicas at target (1400 m), then 20× the load from t = 100 s: the
        // first sync after the step (105 s) scales up, by at most max(×2, +4)
        // per 15 s period: 4 → 8 → 16 → 32 → 64 → 80 (the need: 28 000 m / 350 m).
        let log = drive(|t| if t < 100.0 { 1400.0 } else { 28_000.0 }, 200.0, 4);
        assert_eq!(
            log,
            vec![
                (105.0, 8),
                (120.0, 16),
                (135.0, 32),
                (150.0, 64),
                (165.0, 80)
            ]
        );
        // From 2 replicas the +4 pods rule is the larger: 2 → 6.
        let log = drive(|t| if t < 100.0 { 700.0 } else { 7000.0 }, 120.0, 2);
        assert_eq!(log.first(), Some(&(105.0, 6)));
    }

    #[test]
    fn hpa_waits_300_s_before_scaling_down() {
        // 2× the target until 200 s: 4 → 8 at 15 s; then back to 1400 m.
        let log = drive(|t| if t < 200.0 { 2800.0 } else { 1400.0 }, 900.0, 4);
        assert_eq!(log[0], (15.0, 8));
        // The last recommendation of 8 is the sync at 195 s; the first sync
        // whose 300 s window no longer holds it is 495 s: 8 → 4 then, not before.
        assert_eq!(log[1..], [(495.0, 4)]);
    }

    #[test]
    fn hpa_respects_min_and_max() {
        let mut h = Hpa::default();
        let mut obs = svc(2, &[5000.0, 5000.0], 0);
        obs.max = 3;
        assert_eq!(h.scale(15.0, &[obs])[0], Some(3));
        let mut h = Hpa::default();
        let mut obs = svc(4, &[0.0; 4], 0);
        obs.min = 2;
        assert_eq!(h.scale(15.0, &[obs])[0], Some(2));
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
