//! One simulated node under one policy: its pods, the CFS model period by
//! period (in segments), the metrics it accumulates, and the policy's decisions
//! landing after the actuation delay.

use std::sync::atomic::{AtomicU64, Ordering};

use super::{
    AVG10_BUCKETS, NodeResult, PERIOD_NS, PERIOD_S, PERIODS_PER_S, PROGRESS_PERIODS, Pod, PodTrace,
    Presence, ServiceTrace, Totals, cfs,
    cfs::{PeriodOutcome, PodLoad},
    n_periods, noise_factor, period_at_or_after,
    policies::{NodeObs, PodObs, ServiceObs, SimPolicy},
    requests, scenario, serve_requests, splitmix,
};
use crate::{demand::Counters, units::PodKey};

/// Per-second accumulators of one traced pod.
#[derive(Default)]
struct TraceAcc {
    pod: usize,
    demand: f64,
    usage: f64,
    periods: u64,
    throttled: u64,
    out: PodTrace,
}

/// Seconds between two HPA syncs (`--horizontal-pod-autoscaler-sync-period`).
pub const HPA_SYNC_S: f64 = 15.0;
/// A pod's demand must have held this long for its limit to be in a steady phase.
const STEADY_S: f64 = 30.0;
/// The kernel's `avg10` decay per 2 s update: e^(−2/10).
const AVG10_DECAY: f64 = 0.818_730_753_077_981_9;

/// One service on the node: its replica slots and what it did.
struct Svc<'a> {
    spec: &'a scenario::ServiceSpec,
    /// Pod indices of its replica slots (`replicas.max` of them).
    slots: Vec<usize>,
    /// Replicas wanted (pending, starting or ready).
    replicas: u32,
    ready: u32,
    /// Incarnations created so far (a new replica gets a new key).
    created: u64,
    /// Its load before noise, this segment.
    load_now: f64,
    /// Upward load steps (time, new load) to come, and those not yet met.
    steps: Vec<(f64, f64)>,
    next_step: usize,
    open: Vec<(f64, f64)>,
    reaction: Vec<f64>,
    scale_events: u64,
    pending_replicas: u64,
    trace: Option<(ServiceTrace, f64, f64, u64)>,
}

impl Svc<'_> {
    /// Σ the ready replicas' limits (no limit: the node's capacity).
    fn capacity(&self, pods: &[Pod], node_m: f64) -> f64 {
        self.slots
            .iter()
            .map(|&i| &pods[i])
            .filter(|p| p.presence == Presence::Ready)
            .map(|p| p.limit_m.map_or(node_m, |l| l as f64))
            .sum()
    }
}

pub(super) struct NodeSim<'a> {
    s: &'a scenario::Scenario,
    ns: &'a scenario::NodeSpec,
    seed: u64,
    node_idx: u64,
    n_periods: u64,
    /// Periods per decision.
    per_decision: u64,
    capacity: f64,
    /// Request loads are served period by period.
    per_period: bool,
    tot: Totals,
    pods: Vec<Pod>,
    /// What a policy would see of each pod (aligned with `pods`).
    templates: Vec<PodObs>,
    /// The pods on the node (placed), and what the policy sees of them.
    present: Vec<usize>,
    obs: Vec<PodObs>,
    present_dirty: bool,
    svcs: Vec<Svc<'a>>,
    /// Whether the policy runs pods without limits.
    unlimited: bool,
    next_sync: f64,
    avg10: Vec<u64>,
    traced: Vec<TraceAcc>,
    loads: Vec<PodLoad>,
    out: Vec<PeriodOutcome>,
    open_loads: Vec<PodLoad>,
    open_out: Vec<PeriodOutcome>,
    scratch: cfs::Scratch,
    /// Each pod's demand before its requests, this segment.
    background: Vec<f64>,
    node_window_usage: f64,
}

impl<'a> NodeSim<'a> {
    /// The node's pods as the scenario states them; under a policy without
    /// limits only the excluded pods (Guaranteed, kube-system) keep theirs.
    pub(super) fn new(
        s: &'a scenario::Scenario,
        ns: &'a scenario::NodeSpec,
        unlimited: bool,
        seed: u64,
        node_idx: u64,
        trace_pods: usize,
    ) -> Self {
        let mut pods: Vec<Pod> = Vec::new();
        let mut obs: Vec<PodObs> = Vec::new();
        let mut traced: Vec<TraceAcc> = Vec::new();
        for ps in &ns.pods {
            for k in 0..ps.count {
                let limit = if unlimited && !ps.excluded {
                    None
                } else {
                    ps.limit_m
                };
                let key = PodKey::from(format!("{}-{node_idx}/{}-{k}", ns.name, ps.name));
                if k == 0 && traced.len() < trace_pods {
                    traced.push(TraceAcc {
                        pod: pods.len(),
                        out: PodTrace {
                            pod: key.to_string(),
                            ..PodTrace::default()
                        },
                        ..TraceAcc::default()
                    });
                }
                let weight = ps.weight.unwrap_or(ps.request_m.max(1) as f64);
                obs.push(PodObs {
                    key,
                    request_m: ps.request_m,
                    original_m: limit,
                    limit_m: limit,
                    weight,
                    counters: Counters::default(),
                    usage_m: 0.0,
                    throttled_ratio: 0.0,
                    excluded: ps.excluded,
                });
                pods.push(Pod {
                    name: ps.name.clone(),
                    svc: None,
                    presence: Presence::Ready,
                    request_m: ps.request_m,
                    limit_m: limit,
                    excluded: ps.excluded,
                    requests: ps.requests.clone().map(|r| {
                        let phase =
                            splitmix(seed ^ splitmix(node_idx ^ splitmix(pods.len() as u64)));
                        (r, requests::RequestQueue::with_phase(phase % 1_000_000))
                    }),
                    weight,
                    demand: ps.demand.clone(),
                    noise: ps.noise,
                    counters: Counters::default(),
                    win_usage: 0.0,
                    win_periods: 0,
                    win_throttled: 0,
                    periods: 0,
                    throttled: 0,
                    pending: Vec::new(),
                    last_change: None,
                    oscillations: 0,
                    resizes: 0,
                    zero_run: 0,
                    starved: false,
                    steps: ps.demand.steps(s.duration_s),
                    next_step: 0,
                    calm_since: None,
                    adapt: Vec::new(),
                    open_steps: Vec::new(),
                    ..Pod::blank()
                });
            }
        }
        let mut svcs = Vec::new();
        for (v, spec) in ns.services.iter().enumerate() {
            let mut slots = Vec::new();
            for slot in 0..spec.replicas.max {
                slots.push(pods.len());
                obs.push(PodObs {
                    key: PodKey::from(format!("{}-{node_idx}/{}-{slot}", ns.name, spec.name)),
                    request_m: spec.request_m,
                    original_m: spec.limit_m,
                    limit_m: spec.limit_m,
                    weight: spec.request_m as f64,
                    counters: Counters::default(),
                    usage_m: 0.0,
                    throttled_ratio: 0.0,
                    excluded: false,
                });
                pods.push(Pod {
                    name: spec.name.clone(),
                    svc: Some(v),
                    presence: Presence::Absent,
                    request_m: spec.request_m,
                    limit_m: spec.limit_m,
                    weight: spec.request_m as f64,
                    demand: spec.load.clone(),
                    noise: spec.noise,
                    ..Pod::blank()
                });
            }
            let steps = spec
                .load
                .steps(s.duration_s)
                .into_iter()
                .filter(|&at| spec.load.at(at) > spec.load.at(at - 1e-6) + 1e-9)
                .map(|at| (at, spec.load.at(at)))
                .collect();
            svcs.push(Svc {
                spec,
                slots,
                replicas: 0,
                ready: 0,
                created: 0,
                load_now: 0.0,
                steps,
                next_step: 0,
                open: Vec::new(),
                reaction: Vec::new(),
                scale_events: 0,
                pending_replicas: 0,
                trace: (node_idx == 1 && trace_pods > 0).then(|| {
                    (
                        ServiceTrace {
                            service: spec.name.clone(),
                            ..ServiceTrace::default()
                        },
                        0.0,
                        0.0,
                        0,
                    )
                }),
            });
        }
        let n = pods.len();
        Self {
            s,
            ns,
            seed,
            node_idx,
            n_periods: n_periods(s),
            per_decision: ((s.decision_interval_s / PERIOD_S).round() as u64).max(1),
            capacity: ns.capacity_m as f64,
            per_period: pods.iter().any(|p| p.requests.is_some()),
            tot: Totals::default(),
            pods,
            templates: obs,
            present: Vec::new(),
            obs: Vec::new(),
            present_dirty: true,
            svcs,
            unlimited,
            next_sync: HPA_SYNC_S,
            avg10: vec![0; AVG10_BUCKETS],
            traced,
            loads: Vec::with_capacity(n),
            out: Vec::with_capacity(n),
            open_loads: Vec::with_capacity(n),
            open_out: Vec::with_capacity(n),
            scratch: cfs::Scratch::default(),
            background: vec![0.0; n],
            node_window_usage: 0.0,
        }
    }

    /// Runs the whole scenario, adding the periods simulated to `done`.
    pub(super) fn run(mut self, pol: &mut dyn SimPolicy, done: &AtomicU64) -> NodeResult {
        // The services' Deployments exist before the run: `min` replicas, ready.
        for v in 0..self.svcs.len() {
            let min = self.svcs[v].spec.replicas.min;
            self.scale_to(v, min, 0.0, false);
            for &i in &self.svcs[v].slots {
                if let Presence::Starting { .. } = self.pods[i].presence {
                    self.pods[i].presence = Presence::Ready;
                }
            }
            self.count_ready(v);
        }
        let mut k = 0u64;
        let mut reported = 0u64;
        while k < self.n_periods {
            let end = self.load(k);
            self.step(k, end);
            if end.is_multiple_of(self.per_decision) {
                self.decide(pol, end);
            }
            if end.is_multiple_of(PROGRESS_PERIODS) || end == self.n_periods {
                done.fetch_add(end - reported, Ordering::Relaxed);
                reported = end;
            }
            k = end;
        }
        self.result()
    }

    /// Lands the limits due at period `k`, opens the demand steps reached and
    /// sets each pod's load; returns the end of the segment `[k, end)`, in
    /// which nothing the CFS model sees changes (no second boundary, decision,
    /// actuation or demand edge).
    fn load(&mut self, k: u64) -> u64 {
        let t = k as f64 * PERIOD_S;
        let mut end = self
            .n_periods
            .min((k / PERIODS_PER_S + 1) * PERIODS_PER_S)
            .min((k / self.per_decision + 1) * self.per_decision);
        if self.per_period {
            end = end.min(k + 1);
        }
        self.loads.clear();
        let second = k / PERIODS_PER_S;
        let (seed, node_idx) = (self.seed, self.node_idx);
        for v in &mut self.svcs {
            v.load_now = v.spec.load.at(t);
            while v.next_step < v.steps.len() && v.steps[v.next_step].0 <= t + 1e-9 {
                v.open.push(v.steps[v.next_step]);
                v.next_step += 1;
            }
        }
        for (i, p) in self.pods.iter_mut().enumerate() {
            if let Some(pos) = p.pending.iter().rposition(|&(at, _)| at <= k) {
                p.limit_m = Some(p.pending[pos].1);
                p.pending.drain(..=pos);
            }
            if let Some(&(at, _)) = p.pending.first() {
                end = end.min(at);
            }
            while p.next_step < p.steps.len() && p.steps[p.next_step] <= t + 1e-9 {
                p.open_steps.push(p.steps[p.next_step]);
                p.next_step += 1;
            }
            end = end.min(period_at_or_after(p.demand.next_change(t), k));
            let base = match p.svc {
                None => p.demand.at(t),
                Some(v) if p.presence == Presence::Ready => {
                    let svc = &self.svcs[v];
                    svc.load_now / f64::from(svc.ready.max(1))
                }
                Some(_) => 0.0,
            };
            if (base - p.base_m).abs() > 1e-9 {
                p.base_m = base;
                p.base_since = t;
            }
            let mut d = base * noise_factor(seed, node_idx, i as u64, second, p.noise);
            self.background[i] = d;
            if let Some((spec, queue)) = &mut p.requests {
                let mut draw = 0u64;
                queue.arrive(spec, k, || {
                    draw += 1;
                    splitmix(
                        seed ^ splitmix(
                            node_idx ^ splitmix((i as u64) ^ splitmix(k ^ (draw << 40))),
                        ),
                    )
                });
                d += queue.wanted_ms(spec) / PERIOD_S;
            }
            self.loads.push(PodLoad {
                demand_m: d,
                quota_m: p.limit_m.map(|l| l as f64),
                weight: p.weight,
            });
        }
        end
    }

    /// Simulates the segment `[k, end)` and accounts for it.
    fn step(&mut self, k: u64, end: u64) {
        let n = end - k;
        cfs::period(self.capacity, &self.loads, &mut self.out, &mut self.scratch);
        if self.per_period {
            serve_requests(
                &mut self.pods,
                &self.loads,
                &self.background,
                &mut self.out,
                k,
            );
        }
        self.shortfall(n);
        self.account(k, end);
        self.trace(end, n);
    }

    /// φ: what each pod would get with no limits (the same demand, shared by
    /// weight), for the fair-share shortfall. Skipped when no quota is below
    /// its pod's demand: the outcome is then φ itself.
    fn shortfall(&mut self, n: u64) {
        if !self
            .loads
            .iter()
            .any(|l| l.quota_m.is_some_and(|q| l.demand_m > q + 1e-9))
        {
            return;
        }
        self.open_loads.clear();
        self.open_loads.extend(self.loads.iter().map(|l| PodLoad {
            quota_m: None,
            ..*l
        }));
        cfs::period(
            self.capacity,
            &self.open_loads,
            &mut self.open_out,
            &mut self.scratch,
        );
        for (o, f) in self.out.iter().zip(&self.open_out) {
            self.tot.shortfall += (f.usage_m - o.usage_m).max(0.0) * PERIOD_S / 1000.0 * n as f64;
        }
    }

    /// The segment's counters, totals, fairness and adaptation times.
    fn account(&mut self, k: u64, end: u64) {
        let n = end - k;
        let nf = n as f64;
        let t = k as f64 * PERIOD_S;
        let tot = &mut self.tot;
        let (mut c_sum, mut c_sq, mut c_n) = (0.0, 0.0, 0u32);
        let (mut used, mut held_back) = (0.0, 0.0);
        let t_end = end as f64 * PERIOD_S;
        let dt = nf * PERIOD_S;
        let second_ends = end.is_multiple_of(PERIODS_PER_S);
        let psi_update = end.is_multiple_of(2 * PERIODS_PER_S);
        tot.capacity += self.capacity * dt / 1000.0;
        for v in &mut self.svcs {
            if !v.open.is_empty() {
                let cap = v.capacity(&self.pods, self.capacity);
                v.open.retain(|&(at, need)| {
                    let met = cap >= need - 1e-6;
                    if met {
                        v.reaction.push((t - at).max(0.0));
                    }
                    !met
                });
            }
            if v.ready == 0 {
                // Nobody serves the load.
                tot.unmet += v.load_now * dt / 1000.0;
                tot.demand += v.load_now * dt / 1000.0;
            }
            tot.replica_s += f64::from(v.ready) * dt;
        }
        let mut requested = 0.0;
        let (mut ready, mut calm) = (0u32, 0u64);
        for ((p, l), o) in self.pods.iter_mut().zip(&self.loads).zip(&self.out) {
            if p.presence.placed() {
                requested += p.request_m as f64;
            }
            if p.presence == Presence::Ready {
                p.served = true;
                ready += 1;
                if p.svc.is_some() {
                    p.hpa_usage += o.usage_m * nf;
                    p.hpa_periods += n;
                }
                if l.demand_m > o.usage_m + 1e-9 {
                    let stall = ((l.demand_m - o.usage_m) / l.demand_m).min(1.0) * dt;
                    p.psi_window_s += stall;
                    tot.stall_s += stall;
                }
                if second_ends
                    && let Some(lim) = p.limit_m
                    && t_end - p.base_since >= STEADY_S - 1e-9
                {
                    let x = lim as f64;
                    p.cv = (p.cv.0 + 1, p.cv.1 + x, p.cv.2 + x * x);
                }
                if psi_update && p.avg10 < 1e-7 && p.psi_window_s == 0.0 {
                    // No pressure now nor left to decay (the common case).
                    p.avg10 = 0.0;
                    calm += 1;
                } else if psi_update {
                    let share = (p.psi_window_s / (2.0 * PERIODS_PER_S as f64 * PERIOD_S)).min(1.0);
                    p.avg10 = p.avg10 * AVG10_DECAY + share * (1.0 - AVG10_DECAY);
                    p.psi_window_s = 0.0;
                    let b = (p.avg10 * (AVG10_BUCKETS - 1) as f64).round() as usize;
                    self.avg10[b.min(AVG10_BUCKETS - 1)] += 1;
                }
            }
            p.counters.at_ns += n * PERIOD_NS as u64;
            p.counters.usage_ns += n * (o.usage_m * PERIOD_NS / 1000.0) as u64;
            p.counters.throttled_ns += n * (o.held_back_m * PERIOD_NS / 1000.0) as u64;
            if o.active {
                p.counters.nr_periods += n;
                p.periods += n;
                p.win_periods += n;
            }
            if o.throttled {
                p.counters.nr_throttled += n;
                p.throttled += n;
                p.win_throttled += n;
            }
            p.win_usage += o.usage_m * nf;
            self.node_window_usage += o.usage_m * nf;
            let short = l.demand_m - o.usage_m;
            tot.unmet += short.max(0.0) * PERIOD_S / 1000.0 * nf;
            tot.demand += l.demand_m.max(0.0) * PERIOD_S / 1000.0 * nf;
            used += o.usage_m;
            held_back += o.held_back_m;
            if short > 1e-6 {
                let x = o.usage_m / p.weight;
                c_sum += x;
                c_sq += x * x;
                c_n += 1;
            }
            if let Some(lim) = p.limit_m {
                tot.lim_sum += lim as f64 * nf;
                tot.use_sum += o.usage_m * nf;
            }
            if l.demand_m > 0.0 && o.usage_m <= 1e-9 {
                p.zero_run += n;
                if p.zero_run > 50 {
                    p.starved = true;
                }
            } else {
                p.zero_run = 0;
            }
            // Time to adapt: start of the first second without throttling after a step.
            if o.throttled || short > 1e-6 {
                p.calm_since = None;
            } else if p.calm_since.is_none() {
                p.calm_since = Some(t);
            }
            if let Some(c) = p.calm_since
                && t_end - c >= 1.0 - 1e-9
            {
                for st in p.open_steps.drain(..) {
                    p.adapt.push((c - st).max(0.0));
                }
            }
        }
        self.avg10[0] += calm;
        tot.ready_s += f64::from(ready) * dt;
        tot.requested += requested * dt / 1000.0;
        tot.used += used * dt / 1000.0;
        tot.held_back += held_back * dt / 1000.0;
        let idle = (self.capacity - used).max(0.0);
        tot.idle_throttled += idle.min(held_back) * PERIOD_S / 1000.0 * nf;
        if c_n >= 2 && c_sq > 0.0 {
            tot.jain_sum += c_sum * c_sum / (f64::from(c_n) * c_sq) * nf;
            tot.jain_n += n;
        }
    }

    /// The traced pods' and services' per-second series.
    fn trace(&mut self, end: u64, n: u64) {
        let nf = n as f64;
        let second_ends = end.is_multiple_of(PERIODS_PER_S) || end == self.n_periods;
        for v in &mut self.svcs {
            let cap = if second_ends {
                v.capacity(&self.pods, self.capacity)
            } else {
                0.0
            };
            let Some((tr, load, usage, periods)) = &mut v.trace else {
                continue;
            };
            *load += v.load_now * nf;
            *usage += v.slots.iter().map(|&i| self.out[i].usage_m).sum::<f64>() * nf;
            *periods += n;
            if second_ends {
                let np = (*periods).max(1) as f64;
                tr.load_m.push(*load / np);
                tr.usage_m.push(*usage / np);
                tr.ready.push(v.ready);
                tr.replicas.push(v.replicas);
                tr.capacity_m.push(cap);
                (*load, *usage, *periods) = (0.0, 0.0, 0);
            }
        }
        for tr in &mut self.traced {
            let (l, o) = (&self.loads[tr.pod], &self.out[tr.pod]);
            tr.demand += l.demand_m * nf;
            tr.usage += o.usage_m * nf;
            tr.periods += n;
            if o.throttled {
                tr.throttled += n;
            }
            if end.is_multiple_of(PERIODS_PER_S) || end == self.n_periods {
                let np = tr.periods.max(1) as f64;
                tr.out.demand_m.push(tr.demand / np);
                tr.out.usage_m.push(tr.usage / np);
                tr.out.limit_m.push(self.pods[tr.pod].limit_m);
                tr.out.throttled.push(tr.throttled as f64 / np);
                (tr.demand, tr.usage, tr.periods, tr.throttled) = (0.0, 0.0, 0, 0);
            }
        }
    }

    /// The policy observes the window ending at `end` and decides; its new
    /// limits land after the actuation delay.
    fn decide(&mut self, pol: &mut dyn SimPolicy, end: u64) {
        let now = end as f64 * PERIOD_S;
        let per_decision = self.per_decision as f64;
        if !self.svcs.is_empty() {
            self.lifecycle(now);
            if now + 1e-9 >= self.next_sync {
                self.next_sync += HPA_SYNC_S;
                self.sync(pol, now);
            }
        }
        if self.present_dirty {
            self.present_dirty = false;
            self.present.clear();
            self.obs.clear();
            for (i, p) in self.pods.iter().enumerate() {
                if p.presence.placed() {
                    self.present.push(i);
                    self.obs.push(self.templates[i].clone());
                }
            }
        }
        for (&i, o) in self.present.iter().zip(self.obs.iter_mut()) {
            let p = &self.pods[i];
            o.limit_m = p.pending.last().map(|x| x.1).or(p.limit_m);
            o.counters = p.counters;
            o.usage_m = p.win_usage / per_decision;
            o.throttled_ratio = if p.win_periods == 0 {
                0.0
            } else {
                p.win_throttled as f64 / p.win_periods as f64
            };
        }
        let node = NodeObs {
            capacity_m: self.ns.capacity_m,
            usage_m: self.node_window_usage / per_decision,
        };
        let wanted = pol.decide(now, &node, &self.obs);
        let land = period_at_or_after(now + self.s.actuation_delay_s, end.saturating_sub(1));
        for ((&i, w), o) in self.present.iter().zip(wanted).zip(&self.obs) {
            let p = &mut self.pods[i];
            p.win_usage = 0.0;
            p.win_periods = 0;
            p.win_throttled = 0;
            let (Some(new), Some(cur)) = (w, o.limit_m) else {
                continue;
            };
            if p.excluded || new == cur {
                continue;
            }
            p.pending.push((land, new));
            p.resizes += 1;
            let dir: i8 = if new > cur { 1 } else { -1 };
            if let Some((at, d)) = p.last_change
                && d != dir
                && now - at <= 60.0
            {
                p.oscillations += 1;
            }
            p.last_change = Some((now, dir));
        }
        self.node_window_usage = 0.0;
    }

    fn count_ready(&mut self, v: usize) {
        let pods = &self.pods;
        let svc = &mut self.svcs[v];
        svc.ready = svc
            .slots
            .iter()
            .filter(|&&i| pods[i].presence == Presence::Ready)
            .count() as u32;
    }

    /// Replicas whose start-up is over serve; pending ones are placed where
    /// their request fits (in creation order, as the scheduler's queue).
    fn lifecycle(&mut self, now: f64) {
        let mut free = self.ns.capacity_m as f64
            - self
                .pods
                .iter()
                .filter(|p| p.presence.placed())
                .map(|p| p.request_m as f64)
                .sum::<f64>();
        for v in 0..self.svcs.len() {
            let startup = self.svcs[v].spec.startup_s;
            for si in 0..self.svcs[v].slots.len() {
                let i = self.svcs[v].slots[si];
                let p = &mut self.pods[i];
                match p.presence {
                    Presence::Pending if p.request_m as f64 <= free + 1e-9 => {
                        free -= p.request_m as f64;
                        p.presence = Presence::Starting {
                            ready_at: now + startup,
                        };
                        self.present_dirty = true;
                    }
                    Presence::Pending if !p.was_pending => {
                        p.was_pending = true;
                        self.svcs[v].pending_replicas += 1;
                    }
                    _ => {}
                }
                if let Presence::Starting { ready_at } = p.presence
                    && ready_at <= now + 1e-9
                {
                    p.presence = Presence::Ready;
                }
            }
            self.count_ready(v);
        }
    }

    /// An HPA sync: the policy sees each service's replicas and their usage
    /// since the last sync, and may change their number.
    fn sync(&mut self, pol: &mut dyn SimPolicy, now: f64) {
        let obs: Vec<ServiceObs> = self
            .svcs
            .iter()
            .map(|v| ServiceObs {
                replicas: v.replicas,
                min: v.spec.replicas.min,
                max: v.spec.replicas.max,
                target_pct: v.spec.target_utilization_pct,
                request_m: v.spec.request_m,
                pods: v
                    .slots
                    .iter()
                    .map(|&i| &self.pods[i])
                    .filter(|p| p.presence != Presence::Absent)
                    .map(|p| {
                        (p.presence == Presence::Ready && p.hpa_periods > 0)
                            .then(|| p.hpa_usage / p.hpa_periods as f64)
                    })
                    .collect(),
            })
            .collect();
        for p in &mut self.pods {
            p.hpa_usage = 0.0;
            p.hpa_periods = 0;
        }
        let want = pol.scale(now, &obs);
        for (v, w) in want.into_iter().enumerate() {
            if let Some(w) = w {
                self.scale_to(v, w, now, true);
            }
        }
        self.lifecycle(now);
    }

    /// Sets service `v` to `want` replicas: new ones are created Pending (and
    /// placed where they fit), surplus ones removed — pending first, then
    /// starting, then ready, newest first, as a ReplicaSet scales down.
    fn scale_to(&mut self, v: usize, want: u32, now: f64, counted: bool) {
        let svc = &self.svcs[v];
        let want = want.clamp(svc.spec.replicas.min, svc.spec.replicas.max);
        let cur = svc.replicas;
        if want == cur {
            return;
        }
        if counted {
            self.svcs[v].scale_events += 1;
        }
        if want > cur {
            let mut add = want - cur;
            for si in 0..self.svcs[v].slots.len() {
                if add == 0 {
                    break;
                }
                let i = self.svcs[v].slots[si];
                if self.pods[i].presence != Presence::Absent {
                    continue;
                }
                add -= 1;
                let spec = self.svcs[v].spec;
                self.svcs[v].created += 1;
                let incarnation = self.svcs[v].created;
                let limit = if self.unlimited { None } else { spec.limit_m };
                let key = PodKey::from(format!(
                    "{}-{}/{}-{si}-{incarnation}",
                    self.ns.name, self.node_idx, spec.name
                ));
                let t = &mut self.templates[i];
                t.key = key;
                t.original_m = limit;
                let p = &mut self.pods[i];
                p.presence = Presence::Pending;
                p.limit_m = limit;
                p.pending.clear();
                p.counters = Counters::default();
                p.was_pending = false;
                p.base_since = now;
                p.avg10 = 0.0;
                p.psi_window_s = 0.0;
            }
        } else {
            let mut remove = cur - want;
            for rank in 0..3 {
                for si in (0..self.svcs[v].slots.len()).rev() {
                    if remove == 0 {
                        break;
                    }
                    let p = &mut self.pods[self.svcs[v].slots[si]];
                    let r = match p.presence {
                        Presence::Pending => 0,
                        Presence::Starting { .. } => 1,
                        Presence::Ready => 2,
                        Presence::Absent => continue,
                    };
                    if r == rank {
                        p.presence = Presence::Absent;
                        p.pending.clear();
                        remove -= 1;
                    }
                }
            }
            self.present_dirty = true;
        }
        self.svcs[v].replicas = want;
        self.lifecycle(now);
    }

    /// What the node contributes to the policy's metrics.
    fn result(mut self) -> NodeResult {
        let mut r = NodeResult {
            tot: self.tot,
            traces: self.traced.into_iter().map(|t| t.out).collect(),
            ..NodeResult::default()
        };
        for v in &mut self.svcs {
            r.reaction.append(&mut v.reaction);
            r.reaction_censored += v.open.len() as u64;
            r.scale_events += v.scale_events;
            r.pending_replicas += v.pending_replicas;
            if let Some((tr, ..)) = v.trace.take() {
                r.services.push(tr);
            }
        }
        r.avg10 = std::mem::take(&mut self.avg10);
        for p in &mut self.pods {
            if !p.served {
                // A replica slot never used.
                continue;
            }
            if p.cv.0 >= 2 {
                let (n, sum, sq) = (p.cv.0 as f64, p.cv.1, p.cv.2);
                let mean = sum / n;
                if mean > 0.0 {
                    r.cvs.push(((sq / n - mean * mean).max(0.0)).sqrt() / mean);
                }
            }
            if let Some((_, q)) = &mut p.requests {
                r.latencies
                    .entry(p.name.clone())
                    .or_default()
                    .append(&mut q.latencies_ms);
            }
            r.censored += p.open_steps.drain(..).count() as u64;
            r.ratios.push(if p.periods == 0 {
                0.0
            } else {
                p.throttled as f64 / p.periods as f64
            });
            r.adapt.append(&mut p.adapt);
            r.resizes += p.resizes;
            r.oscillations += p.oscillations;
            r.starved += u64::from(p.starved);
        }
        r
    }
}
