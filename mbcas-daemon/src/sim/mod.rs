//! Closed-loop simulator: the daemon's decision code against a simulated CFS.
//!
//! Nodes and pods come from a [`scenario::Scenario`]; time advances in 100 ms CFS
//! periods ([`cfs::period`]); every `decision_interval_s` each node's policy sees
//! the counters the kernel would report (usage, periods, throttled periods,
//! throttled time) and asks for new limits, which take effect after
//! `actuation_delay_s`. Deterministic for a given seed (demand noise comes from a
//! SplitMix64 stream keyed by seed, node, pod and second).

pub mod cfs;
pub mod cluster;
pub mod cmd;
pub mod evaluate;
mod node;
pub mod policies;
pub mod requests;
pub mod scenario;

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::PathBuf,
    sync::atomic::{AtomicU64, AtomicUsize, Ordering},
};

use serde::Serialize;

use self::{
    cfs::{PeriodOutcome, PodLoad},
    scenario::{Demand, Scenario},
};
use crate::demand::Counters;

pub const PERIOD_S: f64 = 0.1;
const PERIOD_NS: f64 = 1e8;

#[derive(Debug, clap::Args)]
pub struct SimulateArgs {
    /// Scenario file (JSON; see scenarios/ in the repository).
    #[arg(long, value_name = "FILE")]
    pub scenario: PathBuf,
    /// Policy to run (repeatable; default: the six vertical ones, plus `hpa` and
    /// `mbcas+hpa` when the scenario has services).
    #[arg(long = "policy", value_name = "NAME", value_parser = clap::builder::PossibleValuesParser::new(policies::EVERY))]
    pub policies: Vec<String>,
    /// Seed of the demand noise.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Directory for summary.json, summary.md, metrics.prom and trace.json
    /// (time series of a few pods; `cargo xtask sim-charts DIR` draws the PNGs).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Threads to simulate nodes on (0: one per CPU); results do not depend on it.
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Print the summary as JSON on standard output (a progress bar goes to
    /// standard error, and only when it is a terminal).
    #[arg(long)]
    pub json: bool,
}

/// The outcome of one policy on one scenario.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct PolicyMetrics {
    pub throttled_ratio_p50: f64,
    pub throttled_ratio_p99: f64,
    pub unmet_core_seconds: f64,
    /// All the demand of the run, core-seconds (what unmet demand is a share of).
    pub demand_core_seconds: f64,
    /// Σ min(idle CPU, CPU held back by quotas) over time, core-seconds: how much
    /// of the throttling happened while the node had CPU to spare.
    pub idle_while_throttled_core_seconds: f64,
    pub jain: f64,
    pub slack_pct: f64,
    pub resizes_per_pod_hour: f64,
    pub oscillations: u64,
    /// Time to adapt after the demand steps that did adapt before the run ended.
    pub adapt_p50_s: f64,
    pub adapt_p99_s: f64,
    /// Demand steps still not adapted to when the run ended (censored).
    pub adapt_censored: u64,
    /// Fair-share shortfall, core-seconds: Σ (min(demand, φ) − usage)⁺ with φ
    /// what the pod would get with no limits (the node shared by weight).
    pub fair_shortfall_core_seconds: f64,
    pub starved_pods: u64,
    pub pods: u64,
    /// Requests completed by pods with a request load (see [`requests`]).
    pub requests: u64,
    /// Median and p99 request latency, milliseconds (0 without requests).
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    /// The same per pod (by the scenario's pod name, over its replicas and nodes).
    pub latency_by_pod: BTreeMap<String, Latency>,
    /// CPU used over the nodes' capacity, percent.
    pub cpu_util_node_pct: f64,
    /// CPU used over the CPU requested by the pods on the nodes, percent.
    pub cpu_util_requested_pct: f64,
    /// Runnable CPU held back by quotas, core-seconds (the kernel's
    /// `throttled_time`, summed over pods).
    pub throttled_core_seconds: f64,
    /// Simulated `cpu.pressure` "some" of the pods: the share of their serving
    /// time they had runnable work they could not run (waiting on their quota or
    /// on the run queue), percent, over all pods.
    pub psi_some_pct: f64,
    /// p99 of the pods' `avg10` (updated every 2 s, as the kernel does), percent.
    pub psi_some_avg10_p99: f64,
    /// Mean over pods of each limit's coefficient of variation in steady phases
    /// (the pod's demand unchanged for 30 s); 0 where no pod had one.
    pub limit_cv: f64,
    /// Time from an upward step of a service's load to its ready replicas'
    /// limits adding up to the new load (no limit counts as the node), seconds.
    pub reaction_p50_s: f64,
    pub reaction_p99_s: f64,
    /// Upward steps the service's capacity had not caught up with by the end.
    pub reaction_censored: u64,
    /// Upward steps of service loads (reacted to or not).
    pub reaction_steps: u64,
    /// Mean ready replicas of a service over time (0 without services).
    pub replicas_mean: f64,
    /// Replica count changes (scale-ups and scale-downs), summed over services.
    pub scale_events: u64,
    /// Replicas that waited Pending (no room for their request) at some point.
    pub pending_replicas: u64,
}

/// Request latency of one pod spec.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Latency {
    pub requests: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

#[derive(Debug, Serialize)]
pub struct Summary {
    pub scenario: String,
    pub seed: u64,
    pub policies: BTreeMap<String, PolicyMetrics>,
}

/// Where a pod slot is in its life (fixed pods are always `Ready`).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Presence {
    /// A replica slot of a service that is not in use.
    Absent,
    /// Created, waiting for room for its request on the node.
    Pending,
    /// On the node, not serving before `ready_at` (seconds).
    Starting {
        ready_at: f64,
    },
    Ready,
}

impl Presence {
    /// On the node (holding its request), serving or not.
    fn placed(self) -> bool {
        matches!(self, Self::Starting { .. } | Self::Ready)
    }
}

struct Pod {
    /// The scenario's pod name (replicas share it).
    name: String,
    /// The service this pod is a replica of (index on its node).
    svc: Option<usize>,
    presence: Presence,
    request_m: u64,
    limit_m: Option<u64>,
    excluded: bool,
    requests: Option<(requests::RequestSpec, requests::RequestQueue)>,
    weight: f64,
    demand: Demand,
    noise: f64,
    counters: Counters,
    // Window accumulators.
    win_usage: f64,
    win_periods: u64,
    win_throttled: u64,
    // Metric accumulators.
    periods: u64,
    throttled: u64,
    pending: Vec<(u64, u64)>,
    last_change: Option<(f64, i8)>,
    oscillations: u64,
    resizes: u64,
    zero_run: u64,
    starved: bool,
    steps: Vec<f64>,
    next_step: usize,
    calm_since: Option<f64>,
    adapt: Vec<f64>,
    open_steps: Vec<f64>,
    /// It was ready (serving) at some point.
    served: bool,
    /// Stalled seconds in the current 2 s PSI window, and the `avg10` average.
    psi_window_s: f64,
    avg10: f64,
    /// Its demand before noise, and since when (for the steady phases).
    base_m: f64,
    base_since: f64,
    /// Limit samples (count, Σ, Σ²) taken each second of a steady phase.
    cv: (u64, f64, f64),
    /// Usage × periods and periods ready since the last HPA sync.
    hpa_usage: f64,
    hpa_periods: u64,
    /// This incarnation waited Pending (counted once).
    was_pending: bool,
}

impl Pod {
    /// A pod with no demand, limit or history (fields to fill in).
    fn blank() -> Self {
        Self {
            name: String::new(),
            svc: None,
            presence: Presence::Ready,
            request_m: 0,
            limit_m: None,
            excluded: false,
            requests: None,
            weight: 1.0,
            demand: Demand::Steady { m: 0.0 },
            noise: 0.0,
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
            steps: Vec::new(),
            next_step: 0,
            calm_since: None,
            adapt: Vec::new(),
            open_steps: Vec::new(),
            served: false,
            psi_window_s: 0.0,
            avg10: 0.0,
            base_m: 0.0,
            base_since: 0.0,
            cv: (0, 0.0, 0.0),
            hpa_usage: 0.0,
            hpa_periods: 0,
            was_pending: false,
        }
    }
}

/// Per-second time series of one pod under one policy (for charts).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct PodTrace {
    pub pod: String,
    /// Mean demand over each second, millicores.
    pub demand_m: Vec<f64>,
    /// Mean usage over each second, millicores.
    pub usage_m: Vec<f64>,
    /// Limit in effect at the end of each second (`None`: no limit).
    pub limit_m: Vec<Option<u64>>,
    /// Share of each second's CFS periods that ended throttled.
    pub throttled: Vec<f64>,
}

/// Per-second time series of one service under one policy (for the
/// convergence charts of `cargo xtask evaluate`).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ServiceTrace {
    pub service: String,
    /// The service's load before noise, millicores.
    pub load_m: Vec<f64>,
    /// Mean usage of its replicas over each second, summed, millicores.
    pub usage_m: Vec<f64>,
    /// Ready replicas at the end of each second.
    pub ready: Vec<u32>,
    /// Replicas wanted (ready, starting or pending).
    pub replicas: Vec<u32>,
    /// Σ the ready replicas' limits (no limit: the node's capacity), millicores.
    pub capacity_m: Vec<f64>,
}

/// One policy's metrics and, when asked for, the traces of representative pods.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PolicyRun {
    pub metrics: PolicyMetrics,
    pub traces: Vec<PodTrace>,
    /// The services of the first node (when traces were asked for).
    pub services: Vec<ServiceTrace>,
}

/// Options of one run beyond scenario, policy and seed.
#[derive(Default)]
pub struct RunOptions<'a> {
    /// Record [`PodTrace`]s of the first pod of each pod spec on the first node
    /// (at most this many pods).
    pub trace_pods: usize,
    /// Called with the number of node-periods simulated since the last call.
    pub progress: Option<&'a mut dyn FnMut(u64)>,
    /// Threads to simulate nodes on (0: one per CPU).
    pub threads: usize,
}

/// Periods between two progress updates of one node.
const PROGRESS_PERIODS: u64 = 600;

/// Node-periods a run of `s` simulates (the unit of [`RunOptions::progress`]).
pub fn work(s: &Scenario) -> u64 {
    let nodes: u64 = s.nodes.iter().map(|n| u64::from(n.count)).sum();
    nodes * n_periods(s)
}

fn n_periods(s: &Scenario) -> u64 {
    (s.duration_s / PERIOD_S).round() as u64
}

const PERIODS_PER_S: u64 = 10;

/// The first period index `> k` at or after time `at` (seconds).
fn period_at_or_after(at: f64, k: u64) -> u64 {
    if !at.is_finite() {
        return u64::MAX;
    }
    // Err early: a boundary too soon only costs a re-evaluation.
    let p = (at / PERIOD_S - 1e-6).ceil().max(0.0) as u64;
    p.max(k + 1)
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A factor in [1 − noise, 1 + noise], fixed per (seed, node, pod, second).
fn noise_factor(seed: u64, node: u64, pod: u64, second: u64, noise: f64) -> f64 {
    if noise == 0.0 {
        return 1.0;
    }
    let r = splitmix(seed ^ splitmix(node ^ splitmix(pod ^ splitmix(second))));
    let u = (r >> 11) as f64 / (1u64 << 53) as f64;
    1.0 + noise * (2.0 * u - 1.0)
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// Runs one policy over the whole scenario (`None`: unknown policy).
pub fn run_policy(s: &Scenario, policy: &str, seed: u64) -> Option<PolicyMetrics> {
    run_policy_with(s, policy, seed, RunOptions::default()).map(|r| r.metrics)
}

/// Metric sums over one node (added up over nodes in node order).
#[derive(Default)]
struct Totals {
    unmet: f64,
    demand: f64,
    idle_throttled: f64,
    shortfall: f64,
    jain_sum: f64,
    jain_n: u64,
    lim_sum: f64,
    use_sum: f64,
    /// Core-seconds used, offered by the node, requested by placed pods, held back by quotas.
    used: f64,
    capacity: f64,
    requested: f64,
    held_back: f64,
    /// Pod-seconds ready and stalled.
    ready_s: f64,
    stall_s: f64,
    /// Ready replica-seconds, over services.
    replica_s: f64,
}

/// `avg10` samples in 0.1 % buckets (0–100 %), for a p99 without keeping them.
const AVG10_BUCKETS: usize = 1001;

/// What one node contributes to a policy's metrics.
#[derive(Default)]
struct NodeResult {
    tot: Totals,
    /// Per pod: throttled periods / periods.
    ratios: Vec<f64>,
    /// Times to adapt after each demand step.
    adapt: Vec<f64>,
    /// Steps never adapted to.
    censored: u64,
    /// Request latencies, milliseconds, by pod name.
    latencies: BTreeMap<String, Vec<f64>>,
    resizes: u64,
    oscillations: u64,
    starved: u64,
    traces: Vec<PodTrace>,
    services: Vec<ServiceTrace>,
    /// Histogram of the pods' `avg10` samples ([`AVG10_BUCKETS`] buckets).
    avg10: Vec<u64>,
    /// Coefficient of variation of each limit that had a steady phase.
    cvs: Vec<f64>,
    reaction: Vec<f64>,
    reaction_censored: u64,
    scale_events: u64,
    pending_replicas: u64,
}

/// Runs one policy over the whole scenario, with traces and progress as asked.
///
/// Nodes are independent (each runs its own policy instance) and are simulated
/// on `threads` threads; their results are combined in node order, so the
/// outcome does not depend on the number of threads.
///
/// Time advances in segments: runs of periods in which no input of the CFS model
/// changes (no second boundary, decision, actuation or demand edge), whose
/// outcome is computed once and accounted for every period of the run, exactly
/// as period-by-period simulation would.
pub fn run_policy_with(
    s: &Scenario,
    policy: &str,
    seed: u64,
    opts: RunOptions<'_>,
) -> Option<PolicyRun> {
    let ctx = |ns: &scenario::NodeSpec| policies::Context {
        decision_interval_s: s.decision_interval_s,
        reserve: ns.reserve,
    };
    policies::by_name(
        policy,
        &policies::Context {
            decision_interval_s: s.decision_interval_s,
            reserve: 0.0,
        },
    )?;
    let mut jobs: Vec<(&scenario::NodeSpec, u64)> = Vec::new();
    for ns in &s.nodes {
        for _ in 0..ns.count {
            jobs.push((ns, jobs.len() as u64 + 1));
        }
    }
    let threads = if opts.threads == 0 {
        std::thread::available_parallelism().map_or(1, usize::from)
    } else {
        opts.threads
    }
    .clamp(1, jobs.len().max(1));
    let trace_pods = opts.trace_pods;
    let done = AtomicU64::new(0);
    // Each node's avg10 histogram is added into its thread's as it finishes
    // (integer counts: the order does not matter), not kept per node.
    let node = |(ns, idx): (&scenario::NodeSpec, u64), hist: &mut Vec<u64>| {
        let trace = if idx == 1 { trace_pods } else { 0 };
        policies::by_name(policy, &ctx(ns)).map(|mut pol| {
            let mut r = node::NodeSim::new(s, ns, pol.unlimited(), seed, idx, trace)
                .run(pol.as_mut(), &done);
            if hist.is_empty() {
                hist.resize(AVG10_BUCKETS, 0);
            }
            for (a, b) in hist.iter_mut().zip(&r.avg10) {
                *a += b;
            }
            r.avg10 = Vec::new();
            r
        })
    };
    let mut avg10 = vec![0u64; AVG10_BUCKETS];
    let mut progress = opts.progress;
    let mut results: Vec<Option<NodeResult>> = Vec::with_capacity(jobs.len());
    if threads == 1 {
        for &job in &jobs {
            results.push(node(job, &mut avg10));
            if let Some(f) = progress.as_mut() {
                f(done.swap(0, Ordering::Relaxed));
            }
        }
    } else {
        results.resize_with(jobs.len(), || None);
        let next = AtomicUsize::new(0);
        std::thread::scope(|sc| {
            let handles: Vec<_> = (0..threads)
                .map(|_| {
                    sc.spawn(|| {
                        let (mut mine, mut hist) = (Vec::new(), Vec::new());
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            let Some(&job) = jobs.get(i) else {
                                break;
                            };
                            mine.push((i, node(job, &mut hist)));
                        }
                        (mine, hist)
                    })
                })
                .collect();
            if let Some(f) = progress.as_mut() {
                while !handles.iter().all(|h| h.is_finished()) {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                    f(done.swap(0, Ordering::Relaxed));
                }
            }
            for h in handles {
                match h.join() {
                    Ok((mine, hist)) => {
                        for (a, b) in avg10.iter_mut().zip(&hist) {
                            *a += b;
                        }
                        for (i, r) in mine {
                            results[i] = r;
                        }
                    }
                    Err(panic) => std::panic::resume_unwind(panic),
                }
            }
        });
        if let Some(f) = progress.as_mut() {
            f(done.swap(0, Ordering::Relaxed));
        }
    }
    let mut all = NodeResult::default();
    for r in results {
        let r = r?;
        all.tot.unmet += r.tot.unmet;
        all.tot.demand += r.tot.demand;
        all.tot.idle_throttled += r.tot.idle_throttled;
        all.tot.shortfall += r.tot.shortfall;
        all.tot.jain_sum += r.tot.jain_sum;
        all.tot.jain_n += r.tot.jain_n;
        all.tot.lim_sum += r.tot.lim_sum;
        all.tot.use_sum += r.tot.use_sum;
        all.tot.used += r.tot.used;
        all.tot.capacity += r.tot.capacity;
        all.tot.requested += r.tot.requested;
        all.tot.held_back += r.tot.held_back;
        all.tot.ready_s += r.tot.ready_s;
        all.tot.stall_s += r.tot.stall_s;
        all.tot.replica_s += r.tot.replica_s;
        all.cvs.extend(r.cvs);
        all.reaction.extend(r.reaction);
        all.reaction_censored += r.reaction_censored;
        all.scale_events += r.scale_events;
        all.pending_replicas += r.pending_replicas;
        all.services.extend(r.services);
        all.ratios.extend(r.ratios);
        all.adapt.extend(r.adapt);
        all.censored += r.censored;
        for (name, mut l) in r.latencies {
            all.latencies.entry(name).or_default().append(&mut l);
        }
        all.resizes += r.resizes;
        all.oscillations += r.oscillations;
        all.starved += r.starved;
        all.traces.extend(r.traces);
    }
    all.avg10 = avg10;
    Some(PolicyRun {
        metrics: metrics(s, &mut all),
        traces: std::mem::take(&mut all.traces),
        services: std::mem::take(&mut all.services),
    })
}

/// Serves period `k` of every pod with a request load: the CFS outcome gave
/// the pod its share of the node; the requests run inside it under the pod's
/// quota (after its background demand), and the outcome becomes what they did.
fn serve_requests(
    pods: &mut [Pod],
    loads: &[PodLoad],
    background: &[f64],
    out: &mut [PeriodOutcome],
    k: u64,
) {
    for (i, p) in pods.iter_mut().enumerate() {
        let Some((spec, queue)) = &mut p.requests else {
            continue;
        };
        let (l, o) = (&loads[i], &mut out[i]);
        let capped = l.quota_m.map_or(l.demand_m, |q| l.demand_m.min(q));
        // Below its capped demand without being throttled: the node is contended.
        let speed = if capped > 1e-9 && !o.throttled {
            (o.usage_m / capped).min(1.0)
        } else {
            1.0
        };
        let bg = background[i].min(l.demand_m);
        let bg_used = if l.demand_m > 1e-9 {
            o.usage_m * bg / l.demand_m
        } else {
            0.0
        };
        let quota_ms = l.quota_m.map(|q| (q - bg_used).max(0.0) * PERIOD_S);
        let served = queue.serve(spec, k, quota_ms, speed);
        let bg_throttled = o.throttled && bg > bg_used + 1e-9;
        o.usage_m = bg_used + served.used_ms / PERIOD_S;
        o.throttled = served.throttled || bg_throttled;
        o.held_back_m =
            served.held_back_ms / PERIOD_S + if bg_throttled { bg - bg_used } else { 0.0 };
    }
}

/// The `q` quantile of an [`AVG10_BUCKETS`] histogram of fractions (0–1).
fn histogram_quantile(h: &[u64], q: f64) -> f64 {
    let n: u64 = h.iter().sum();
    if n == 0 {
        return 0.0;
    }
    let rank = ((n - 1) as f64 * q).round() as u64;
    let mut acc = 0u64;
    for (i, c) in h.iter().enumerate() {
        acc += c;
        if acc > rank {
            return i as f64 / (AVG10_BUCKETS - 1) as f64;
        }
    }
    1.0
}

fn metrics(s: &Scenario, all: &mut NodeResult) -> PolicyMetrics {
    let mut latencies: Vec<f64> = all.latencies.values().flatten().copied().collect();
    let latency_by_pod = all
        .latencies
        .iter_mut()
        .map(|(name, l)| {
            (
                name.clone(),
                Latency {
                    requests: l.len() as u64,
                    p50_ms: percentile(l, 0.5),
                    p99_ms: percentile(l, 0.99),
                },
            )
        })
        .collect();
    let pods = all.ratios.len();
    let tot = &all.tot;
    let pct = |a: f64, b: f64| if b > 0.0 { a / b * 100.0 } else { 0.0 };
    let reaction_steps = all.reaction.len() as u64 + all.reaction_censored;
    PolicyMetrics {
        cpu_util_node_pct: pct(tot.used, tot.capacity),
        cpu_util_requested_pct: pct(tot.used, tot.requested),
        throttled_core_seconds: tot.held_back,
        psi_some_pct: pct(tot.stall_s, tot.ready_s),
        psi_some_avg10_p99: histogram_quantile(&all.avg10, 0.99) * 100.0,
        limit_cv: if all.cvs.is_empty() {
            0.0
        } else {
            all.cvs.iter().sum::<f64>() / all.cvs.len() as f64
        },
        reaction_p50_s: percentile(&mut all.reaction, 0.5),
        reaction_p99_s: percentile(&mut all.reaction, 0.99),
        reaction_censored: all.reaction_censored,
        reaction_steps,
        replicas_mean: {
            let services: u64 = s
                .nodes
                .iter()
                .map(|n| u64::from(n.count) * n.services.len() as u64)
                .sum();
            if services > 0 {
                tot.replica_s / s.duration_s / services as f64
            } else {
                0.0
            }
        },
        scale_events: all.scale_events,
        pending_replicas: all.pending_replicas,
        throttled_ratio_p50: percentile(&mut all.ratios, 0.5),
        throttled_ratio_p99: percentile(&mut all.ratios, 0.99),
        unmet_core_seconds: tot.unmet,
        demand_core_seconds: tot.demand,
        idle_while_throttled_core_seconds: tot.idle_throttled,
        jain: if tot.jain_n == 0 {
            1.0
        } else {
            tot.jain_sum / tot.jain_n as f64
        },
        slack_pct: if tot.lim_sum > 0.0 {
            (tot.lim_sum - tot.use_sum) / tot.lim_sum * 100.0
        } else {
            0.0
        },
        // Per hour a pod was serving (fixed pods serve the whole run).
        resizes_per_pod_hour: if tot.ready_s > 0.0 {
            all.resizes as f64 / (tot.ready_s / 3600.0)
        } else {
            0.0
        },
        oscillations: all.oscillations,
        adapt_p50_s: percentile(&mut all.adapt, 0.5),
        adapt_p99_s: percentile(&mut all.adapt, 0.99),
        adapt_censored: all.censored,
        fair_shortfall_core_seconds: tot.shortfall,
        starved_pods: all.starved,
        pods: pods as u64,
        requests: latencies.len() as u64,
        latency_p50_ms: percentile(&mut latencies, 0.5),
        latency_p99_ms: percentile(&mut latencies, 0.99),
        latency_by_pod,
    }
}

/// Runs the listed policies (all when empty) on the same scenario and seed.
pub fn simulate(s: &Scenario, names: &[String], seed: u64) -> Summary {
    simulate_with(s, names, seed, 0, 0, None).0
}

/// Traces of representative pods, per policy (`DIR/trace.json`).
#[derive(Debug, Default, Serialize)]
pub struct Traces {
    pub scenario: String,
    pub seed: u64,
    /// Seconds between two points of a trace.
    pub step_s: f64,
    pub policies: BTreeMap<String, Vec<PodTrace>>,
    /// Services of the first node, per policy (scenarios with services).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub services: BTreeMap<String, Vec<ServiceTrace>>,
}

/// Policy names to run: `names`, or when empty the vertical policies and,
/// for a scenario with services, the horizontal ones.
pub fn policy_names<'a>(s: &Scenario, names: &'a [String]) -> Vec<&'a str> {
    if names.is_empty() {
        let horizontal = s.nodes.iter().any(|n| !n.services.is_empty());
        policies::EVERY
            .into_iter()
            .filter(|p| horizontal || !policies::HORIZONTAL.contains(p))
            .collect()
    } else {
        names.iter().map(String::as_str).collect()
    }
}

/// Like [`simulate`], also tracing up to `trace_pods` pods per policy and
/// reporting progress (node-periods, see [`work`]) to `progress`.
pub fn simulate_with(
    s: &Scenario,
    names: &[String],
    seed: u64,
    trace_pods: usize,
    threads: usize,
    mut progress: Option<&mut dyn FnMut(u64)>,
) -> (Summary, Traces) {
    let mut sum = Summary {
        scenario: s.name.clone(),
        seed,
        policies: BTreeMap::new(),
    };
    let mut traces = Traces {
        scenario: s.name.clone(),
        seed,
        step_s: 1.0,
        policies: BTreeMap::new(),
        services: BTreeMap::new(),
    };
    for name in policy_names(s, names) {
        let opts = RunOptions {
            trace_pods,
            threads,
            progress: progress.as_mut().map(|f| &mut **f as &mut dyn FnMut(u64)),
        };
        if let Some(run) = run_policy_with(s, name, seed, opts) {
            sum.policies.insert(name.to_owned(), run.metrics);
            if trace_pods > 0 {
                traces.policies.insert(name.to_owned(), run.traces);
                if !run.services.is_empty() {
                    traces.services.insert(name.to_owned(), run.services);
                }
            }
        }
    }
    (sum, traces)
}

/// The summary as a markdown table.
pub fn markdown(sum: &Summary) -> String {
    let mut t = format!("### {} (seed {})\n\n", sum.scenario, sum.seed);
    t.push_str("| policy | throttled p50 | throttled p99 | unmet core·s | idle while throttled core·s | fair-share shortfall core·s | Jain | slack % | resizes/pod·h | oscillations | adapt p50 s | adapt p99 s | not adapted | latency p50 ms | latency p99 ms | starved |\n");
    t.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for (name, m) in &sum.policies {
        let _ = writeln!(
            t,
            "| {name} | {:.3} | {:.3} | {:.1} | {:.1} | {:.1} | {:.3} | {:.1} | {:.1} | {} | {:.1} | {:.1} | {} | {:.1} | {:.1} | {} |",
            m.throttled_ratio_p50,
            m.throttled_ratio_p99,
            m.unmet_core_seconds,
            m.idle_while_throttled_core_seconds,
            m.fair_shortfall_core_seconds,
            m.jain,
            m.slack_pct,
            m.resizes_per_pod_hour,
            m.oscillations,
            m.adapt_p50_s,
            m.adapt_p99_s,
            m.adapt_censored,
            m.latency_p50_ms,
            m.latency_p99_ms,
            m.starved_pods
        );
    }
    if sum.policies.values().any(|m| !m.latency_by_pod.is_empty()) {
        t.push_str("\n| policy | pod | requests | latency p50 ms | latency p99 ms |\n|---|---|---|---|---|\n");
        for (name, m) in &sum.policies {
            for (pod, l) in &m.latency_by_pod {
                let _ = writeln!(
                    t,
                    "| {name} | {pod} | {} | {:.1} | {:.1} |",
                    l.requests, l.p50_ms, l.p99_ms
                );
            }
        }
    }
    t
}

/// Name, help text and getter of one exported simulation metric.
type PromMetric = (&'static str, &'static str, fn(&PolicyMetrics) -> f64);

/// The summary as a Prometheus text exposition.
pub fn prometheus(sum: &Summary) -> String {
    let mut t = String::new();
    let metrics: [PromMetric; 22] = [
        (
            "throttled_ratio_p50",
            "Median per-pod throttled-period ratio",
            |m| m.throttled_ratio_p50,
        ),
        (
            "throttled_ratio_p99",
            "p99 per-pod throttled-period ratio",
            |m| m.throttled_ratio_p99,
        ),
        (
            "unmet_core_seconds",
            "Demand not served, core-seconds",
            |m| m.unmet_core_seconds,
        ),
        (
            "demand_core_seconds",
            "All demand of the run, core-seconds",
            |m| m.demand_core_seconds,
        ),
        (
            "idle_while_throttled_core_seconds",
            "CPU held back by quotas while the node had idle CPU, core-seconds",
            |m| m.idle_while_throttled_core_seconds,
        ),
        (
            "jain",
            "Jain index of usage/weight among contending pods",
            |m| m.jain,
        ),
        (
            "slack_percent",
            "Sum of limits minus usage, percent of limits",
            |m| m.slack_pct,
        ),
        ("resizes_per_pod_hour", "Limit changes per pod-hour", |m| {
            m.resizes_per_pod_hour
        }),
        ("oscillations", "Direction changes within 60 s", |m| {
            m.oscillations as f64
        }),
        (
            "adapt_p50_seconds",
            "Median time to adapt after a demand step",
            |m| m.adapt_p50_s,
        ),
        (
            "adapt_p99_seconds",
            "p99 time to adapt after a demand step",
            |m| m.adapt_p99_s,
        ),
        ("starved_pods", "Pods starved for more than 5 s", |m| {
            m.starved_pods as f64
        }),
        (
            "adapt_censored",
            "Demand steps not adapted to when the run ended",
            |m| m.adapt_censored as f64,
        ),
        (
            "fair_shortfall_core_seconds",
            "CPU pods wanted within their no-limits share and did not get, core-seconds",
            |m| m.fair_shortfall_core_seconds,
        ),
        (
            "latency_p50_milliseconds",
            "Median request latency of pods with a request load",
            |m| m.latency_p50_ms,
        ),
        (
            "latency_p99_milliseconds",
            "p99 request latency of pods with a request load",
            |m| m.latency_p99_ms,
        ),
        (
            "cpu_utilization_node_percent",
            "CPU used over the nodes' capacity, percent",
            |m| m.cpu_util_node_pct,
        ),
        (
            "cpu_utilization_requested_percent",
            "CPU used over the pods' requests, percent",
            |m| m.cpu_util_requested_pct,
        ),
        (
            "psi_some_percent",
            "Simulated cpu.pressure some over the pods' serving time, percent",
            |m| m.psi_some_pct,
        ),
        (
            "psi_some_avg10_p99_percent",
            "p99 of the pods' simulated cpu.pressure some avg10, percent",
            |m| m.psi_some_avg10_p99,
        ),
        (
            "limit_cv",
            "Mean coefficient of variation of limits in steady phases",
            |m| m.limit_cv,
        ),
        (
            "reaction_p99_seconds",
            "p99 time from a service's load step to its limits covering it",
            |m| m.reaction_p99_s,
        ),
    ];
    for (name, help, get) in metrics {
        let _ = writeln!(
            t,
            "# HELP mbcas_sim_{name} {help}.\n# TYPE mbcas_sim_{name} gauge"
        );
        for (policy, m) in &sum.policies {
            let _ = writeln!(
                t,
                "mbcas_sim_{name}{{scenario=\"{}\",policy=\"{policy}\"}} {}",
                sum.scenario,
                get(m)
            );
        }
    }
    t
}

#[cfg(test)]
mod tests;
