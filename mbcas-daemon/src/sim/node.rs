//! One simulated node under one policy: its pods, the CFS model period by
//! period (in segments), the metrics it accumulates, and the policy's decisions
//! landing after the actuation delay.

use std::sync::atomic::{AtomicU64, Ordering};

use super::{
    NodeResult, PERIOD_NS, PERIOD_S, PERIODS_PER_S, PROGRESS_PERIODS, Pod, PodTrace, Totals, cfs,
    cfs::{PeriodOutcome, PodLoad},
    n_periods, noise_factor, period_at_or_after,
    policies::{NodeObs, PodObs, SimPolicy},
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
    obs: Vec<PodObs>,
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
                });
            }
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
            obs,
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
            let mut d = p.demand.at(t) * noise_factor(seed, node_idx, i as u64, second, p.noise);
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
        for ((p, l), o) in self.pods.iter_mut().zip(&self.loads).zip(&self.out) {
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
        let idle = (self.capacity - used).max(0.0);
        tot.idle_throttled += idle.min(held_back) * PERIOD_S / 1000.0 * nf;
        if c_n >= 2 && c_sq > 0.0 {
            tot.jain_sum += c_sum * c_sum / (f64::from(c_n) * c_sq) * nf;
            tot.jain_n += n;
        }
    }

    /// The traced pods' per-second series.
    fn trace(&mut self, end: u64, n: u64) {
        let nf = n as f64;
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
        for (p, o) in self.pods.iter().zip(self.obs.iter_mut()) {
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
        for ((p, w), o) in self.pods.iter_mut().zip(wanted).zip(&self.obs) {
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

    /// What the node contributes to the policy's metrics.
    fn result(mut self) -> NodeResult {
        let mut r = NodeResult {
            tot: self.tot,
            traces: self.traced.into_iter().map(|t| t.out).collect(),
            ..NodeResult::default()
        };
        for p in &mut self.pods {
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
